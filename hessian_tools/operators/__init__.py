"""Operators: the Hessian of a model's loss over a dataset, and adapters for other matrices."""
from .adapters import DenseOperator, ScipyOperator, as_operator, to_scipy
from .base import LinearOperator
from .empirical_risk import EmpiricalRisk
from .hessian import HessianOperator
from .recording import MonitoredOperator, RecordingOperator
from .params import ParameterBlock, ParameterSelectionError, select_parameters

__all__ = [
    "DenseOperator", "EmpiricalRisk", "HessianOperator", "LinearOperator", "MonitoredOperator", "ParameterBlock", "ParameterSelectionError", "RecordingOperator", "ScipyOperator",
    "as_operator", "select_parameters", "to_scipy",
]
