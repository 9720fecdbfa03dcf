"""hessian-tools: curvature of trained networks, with error bars.

Data flows one way: checkpoint → operator (:class:`HessianOperator`, any :class:`LinearOperator`) →
estimator (:func:`trace`, :func:`eigenvalues`, :func:`density`, ...) → result (a frozen dataclass
with its error bar, seed and HVP count) → report/figure. This namespace is the library; the
application (models, data, training runs, the command line) lives in :mod:`hessian_tools.app`.

>>> import hessian_tools as ht
>>> op = ht.HessianOperator(model, loss_fn, data)        # doctest: +SKIP
>>> ht.trace(op, rtol=0.01)                              # doctest: +SKIP
>>> ht.trace(op, rtol=0.01, control_variate="ggn")       # doctest: +SKIP
"""

from .bounds.certificate import pac_bayes_certificate
from .bounds.measures import hessian_measures
from .estimators import (
    control_variate_trace,
    density,
    diagonal,
    diagpp,
    eigenvalues,
    extreme_eigenvalues,
    ggn_trace,
    hutchinson,
    hutchinson_diagonal,
    hutchpp,
    quadratic_form,
    quadratic_forms,
    trace,
    xdiag,
    xtrace,
)
from .estimators.paired import paired_traces
from .operators import (
    DenseOperator,
    EmpiricalRisk,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    ParameterBlock,
    UnsupportedLossError,
    as_operator,
    to_scipy,
)
from .optim import ASAM, NSO, SAM, WeightPerturbation, make_optimizer
from .results import (
    CertificateResult,
    ComparisonResult,
    ControlVariateTraceResult,
    DensityResult,
    DiagonalResult,
    EigenResult,
    HessianMeasuresResult,
    PairedDifference,
    QuadratureResult,
    Result,
    StabilityCurveResult,
    StabilityResult,
    TraceResult,
    result_from_dict,
)
from .stability import noise_stability, stability_curve

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "CertificateResult",
    "ComparisonResult",
    "ControlVariateTraceResult",
    "DenseOperator",
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "EmpiricalRisk",
    "FisherOperator",
    "GGNOperator",
    "HessianMeasuresResult",
    "HessianOperator",
    "LinearOperator",
    "NSO",
    "PairedDifference",
    "ParameterBlock",
    "QuadratureResult",
    "Result",
    "SAM",
    "StabilityCurveResult",
    "StabilityResult",
    "TraceResult",
    "UnsupportedLossError",
    "WeightPerturbation",
    "as_operator",
    "control_variate_trace",
    "density",
    "diagonal",
    "diagpp",
    "eigenvalues",
    "extreme_eigenvalues",
    "ggn_trace",
    "hessian_measures",
    "hutchinson",
    "hutchinson_diagonal",
    "hutchpp",
    "make_optimizer",
    "noise_stability",
    "paired_traces",
    "pac_bayes_certificate",
    "quadratic_form",
    "quadratic_forms",
    "result_from_dict",
    "stability_curve",
    "to_scipy",
    "trace",
    "xdiag",
    "xtrace",
]
