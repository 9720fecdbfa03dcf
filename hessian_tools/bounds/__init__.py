"""Generalization bounds: the PAC-Bayes calculator, certificates for checkpoints, and Hessian-based
measures.
"""

from .batchnorm import fold_batchnorm
from .posterior import DEFAULT_LAMBDA_GRID, optimised_certificate, split_for_prior

__all__ = ["DEFAULT_LAMBDA_GRID", "fold_batchnorm", "optimised_certificate", "split_for_prior"]
