"""Data files shipped with the package (read offline).

``digits.csv.gz``: the UCI optical recognition of handwritten digits test set (1,797 8×8 images,
pixel values 0–16, last column the label), as distributed with scikit-learn (BSD-3-Clause,
Copyright (c) 2007-2026 The scikit-learn developers). Original data: E. Alpaydin, C. Kaynak, 1998.
"""
