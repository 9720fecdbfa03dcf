"""Estimators: plain functions over any operator with ``dim`` and ``matmat``."""

from .baston2022diagpp import diagpp
from .control_variate import control_variate_trace, ggn_trace
from .density import density
from .diagonal import diagonal, hutchinson_diagonal
from .eigen import eigenvalues, extreme_eigenvalues
from .epperly2024xtrace import xdiag, xtrace
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp
from .quadrature import quadratic_form, quadratic_forms
from .trace import trace

__all__ = [
    "control_variate_trace",
    "density",
    "diagonal",
    "diagpp",
    "eigenvalues",
    "extreme_eigenvalues",
    "ggn_trace",
    "hutchinson",
    "hutchinson_diagonal",
    "hutchpp",
    "quadratic_form",
    "quadratic_forms",
    "trace",
    "xdiag",
    "xtrace",
]
