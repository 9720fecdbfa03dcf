"""``python -m hessian_tools`` = the ``hessian-tools`` command."""
import sys

from .cli import main

sys.exit(main())
