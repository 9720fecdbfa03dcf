"""Estimators: plain functions over any operator with ``dim`` and ``matmat``."""
from .eigen import eigenvalues
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp
from .trace import trace

__all__ = ["eigenvalues", "hutchinson", "hutchpp", "trace"]
