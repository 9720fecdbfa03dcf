"""``python -m hessian_tools`` = the ``hessian-tools`` command."""

import sys

from .app.cli import main

sys.exit(main())
