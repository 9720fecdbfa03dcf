"""Experiments of the NSO paper reproduced on the library (matrix sensing)."""
