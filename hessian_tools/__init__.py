"""hessian-tools: curvature of trained networks, with error bars.

Data flows one way: checkpoint → :class:`HessianOperator` → estimator → result → report/figure.

>>> import hessian_tools as ht
>>> op = ht.HessianOperator(model, loss_fn, data)        # doctest: +SKIP
>>> ht.trace(op, rtol=0.01)                              # doctest: +SKIP
"""
from .estimators import (
    density, diagonal, diagpp, eigenvalues, hutchinson, hutchinson_diagonal, hutchpp, quadratic_form,
    quadratic_forms, trace, xdiag, xtrace,
)
from .operators import DenseOperator, HessianOperator, ParameterBlock, as_operator, to_scipy
from .results import DensityResult, DiagonalResult, EigenResult, QuadratureResult, Result, TraceResult

__version__ = "0.1.0"

__all__ = [
    "DenseOperator", "DensityResult", "DiagonalResult", "EigenResult", "HessianOperator", "ParameterBlock",
    "QuadratureResult", "Result", "TraceResult", "as_operator", "density", "diagonal", "diagpp", "eigenvalues",
    "hutchinson", "hutchinson_diagonal", "hutchpp", "quadratic_form", "quadratic_forms", "to_scipy", "trace",
    "xdiag", "xtrace",
]
