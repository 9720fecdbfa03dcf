"""Operators: the Hessian, Gauss-Newton and Fisher matrices of a model's loss over a dataset, and adapters."""

from .adapters import DenseOperator, ScipyOperator, as_operator, to_scipy
from .base import LinearOperator
from .empirical_risk import EmpiricalRisk
from .gauss_newton import FisherOperator, GGNOperator, UnsupportedLossError
from .hessian import HessianOperator
from .params import ParameterBlock, ParameterSelectionError, select_parameters
from .recording import MonitoredOperator, RecordingOperator

__all__ = [
    "DenseOperator",
    "EmpiricalRisk",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MonitoredOperator",
    "ParameterBlock",
    "ParameterSelectionError",
    "RecordingOperator",
    "ScipyOperator",
    "UnsupportedLossError",
    "as_operator",
    "select_parameters",
    "to_scipy",
]
