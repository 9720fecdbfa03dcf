"""Exceptions that carry one clear, user-facing line.

Every error raised on bad input is a ``ValueError`` or ``TypeError`` (as the Python convention
asks), and the ones specific to this package also derive from :class:`HessianToolsError`, so the
command line can turn them into a single line on stderr and a non-zero exit.
"""


class HessianToolsError(Exception):
    """Base class of this package's own errors."""


class CheckpointError(HessianToolsError, ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


class NonFiniteError(HessianToolsError, ValueError):
    """A loss, gradient or Hessian-vector product is NaN or infinite."""


class NondeterminismError(HessianToolsError, ValueError):
    """Two passes over the same data gave different losses (e.g. dropout in train mode)."""


class DataError(HessianToolsError, ValueError):
    """The data source is empty or malformed."""
