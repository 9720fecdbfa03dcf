"""Estimators: plain functions over any operator with ``dim`` and ``matmat``."""
from .density import density
from .eigen import eigenvalues
from .epperly2024xtrace import xtrace
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp
from .quadrature import quadratic_form, quadratic_forms
from .trace import trace

__all__ = ["density", "eigenvalues", "hutchinson", "hutchpp", "quadratic_form", "quadratic_forms", "trace", "xtrace"]
