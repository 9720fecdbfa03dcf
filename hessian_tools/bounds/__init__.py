"""Generalization bounds: PAC-Bayes certificates with optimised posteriors."""
from .posterior import DEFAULT_LAMBDA_GRID, fold_batchnorm, optimised_certificate, split_for_prior

__all__ = ["DEFAULT_LAMBDA_GRID", "fold_batchnorm", "optimised_certificate", "split_for_prior"]
