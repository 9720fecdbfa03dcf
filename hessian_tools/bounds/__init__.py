"""Generalization bounds: the PAC-Bayes calculator, certificates for checkpoints, and Hessian-based measures."""
