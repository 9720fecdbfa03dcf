"""BatchNorm folding: make a network's running statistics part of its parameters.

In eval mode a BatchNorm layer computes ``γ(x − m)/√(v + ε) + β`` with running statistics m, v that
were accumulated on the training data. A certificate over the parameters alone would treat them as
fixed although they depend on the sample. Folding rewrites the layer as ``a·x + b`` with
a = γ/√(v + ε) and b = β − m·a in the parameters (running mean 0, running variance 1 − ε), which is
the same function, so a distribution over the folded parameters covers the statistics too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["fold_batchnorm"]


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def fold_batchnorm(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None = None
) -> tuple[nn.Module, tuple]:
    """A deep copy of ``model`` (with ``state`` loaded first, when given) in eval mode in which every
    BatchNorm layer computes its eval-mode map ``γ(x − m)/√(v + ε) + β`` as ``a·x + b``:
    weight ← a = γ/√(v + ε), bias ← b = β − m·a, running mean ← 0, running variance ← 1 − ε.

    The copy computes the same function as the original in eval mode (to rounding), and its
    parameters carry the running statistics. ``model`` is not modified. Returns
    ``(copy, names of the folded BatchNorm modules)``. Raises ValueError for a BatchNorm without
    affine parameters or running statistics (its output would depend on the batch).
    """
    folded = copy.deepcopy(model)
    if state is not None:
        _load_prior_state(folded, state)
    names = []
    for name, module in _batchnorms(folded):
        if not (module.affine and module.track_running_stats and module.running_mean is not None):
            raise ValueError(
                f"BatchNorm {name!r} needs affine=True and running statistics to be folded "
                "(without them its output depends on the batch)"
            )
        if not 0.0 <= module.eps < 1.0:
            raise ValueError(f"BatchNorm {name!r} has eps = {module.eps}; folding needs 0 ≤ eps < 1")
        with torch.no_grad():
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            module.bias.copy_(module.bias - module.running_mean * scale)
            module.weight.copy_(scale)
            module.running_mean.zero_()
            module.running_var.fill_(1.0 - module.eps)
        names.append(name)
    folded.eval()
    return folded, tuple(names)


def _load_prior_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a prior state_dict into ``model`` (a private copy), insisting on every parameter and on
    the running statistics of every BatchNorm layer; other buffers must equal the model's.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"prior_state must be a state_dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    needed = dict(model.named_parameters())
    for name, module in _batchnorms(model):
        if module.running_mean is not None:
            needed[f"{name}.running_mean"] = module.running_mean
            needed[f"{name}.running_var"] = module.running_var
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(
            f"prior_state does not fit the model: {len(missing)} entr(y/ies) missing, "
            f"first: {', '.join(missing[:3])}"
        )
    bad = [
        k
        for k, t in needed.items()
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(t.shape)
    ]
    if bad:
        raise CheckpointError(f"prior_state does not fit the model: shape mismatch at {', '.join(bad[:3])}")
    with torch.no_grad():
        for name, tensor in needed.items():
            tensor.copy_(state[name].to(tensor.device, tensor.dtype))
    other = [
        (n, b) for n, b in model.named_buffers() if n not in needed and b.is_floating_point() and n in state
    ]
    moved = [n for n, b in other if not torch.equal(state[n].to(b.device, b.dtype), b)]
    if moved:
        raise ValueError(
            f"buffer(s) {', '.join(moved[:3])} differ between the model and the prior and are not "
            "BatchNorm statistics: a data-dependent buffer outside the posterior cannot be certified"
        )
