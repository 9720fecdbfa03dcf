"""Generalized Gauss–Newton and Fisher matrices of a model's mean loss, as linear operators.

For the empirical risk f(θ) = (1/N) Σ_n ℓ_n(θ) of
:class:`~hessian_tools.operators.empirical_risk.EmpiricalRisk` (the library's batch-mean
convention: a batch's loss is the mean of its per-sample losses ℓ_n = ℓ(z_n, y_n), z_n the
network's output for sample n) all three operators have the form

    A = (1/N) Σ_n J_nᵀ M_n J_n,      M_n = Σ_r a_nr a_nrᵀ   (C × C, positive semi-definite),

J_n = ∂z_n/∂θ (C × P, the selected parameters θ) and a_nr the rows of an *output factor* of M_n:

* GGN (:class:`GGNOperator`): M_n = Λ_n = ∇²_z ℓ(z_n, y_n). Cross-entropy: Λ = diag(p) − ppᵀ
  (p = softmax(z)), factored as rows a_c = √p_c (e_c − p). MSE (``F.mse_loss``, the mean over all
  N·C entries, so ℓ_n = ‖z_n − y_n‖²/C): Λ = (2/C)·I.
* Empirical Fisher (``FisherOperator(kind="empirical")``): M_n = r_n r_nᵀ with r_n = ∇_z ℓ_n, so
  A = (1/N) Σ_n g_n g_nᵀ with g_n = ∇_θ ℓ_n the gradient of the PER-SAMPLE loss (not of the batch
  mean, which would carry an extra 1/n_b).
* True Fisher (``kind="true"``): M_n = E_{ỹ∼p(·|z_n)}[∇_z ℓ(z_n, ỹ) ∇_z ℓ(z_n, ỹ)ᵀ], the predictive
  distribution of the loss read as a negative log-likelihood: categorical softmax(z) for cross-entropy,
  Gaussian N(z, σ²I) with σ² = C/2 for the MSE above. For both it equals Λ_n exactly, so the exact
  true Fisher IS the GGN. With ``mc_samples=M`` it is the Monte-Carlo version (as curvlinops'
  ``FisherMCLinearOperator``): M_n = (1/M) Σ_m r̃_nm r̃_nmᵀ, r̃_nm = ∇_z ℓ(z_n, ỹ_nm) for sampled
  labels ỹ_nm; the labels are redrawn from the same seed on every product, so A is a fixed matrix.

``matmat(V)``: per batch ONE linearisation of the network (torch.func: a ``vjp`` whose pull-back and
a ``vmap``-ed ``jvp`` serve all K columns), then the output factors, then the pull-back — one pass
over the data through the library's one data loop, batches weighted by size (an uneven last batch is
exact). :meth:`OutputCurvatureOperator.exact_trace` gives tr(A) = (1/N) Σ_n Σ_r ‖J_nᵀ a_nr‖² exactly
with R per-sample vector-Jacobian products per sample (R = C for the GGN).

Samples must be independent: the operators run in ``mode="eval"`` only (BatchNorm with running
statistics), and the loss must be cross-entropy or MSE with the mean reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp, vmap

from ..checks import check_choice, check_integer
from ..errors import HessianToolsError
from ..seeding import MAX_SEED, resolve_seed
from .base import LinearOperator
from .empirical_risk import EmpiricalRisk, check_finite, functional_model_call, model_output
from .hessian import DEFAULT_CHUNK
from .memory import ChunkPlanner, release_freed_memory, resolve_budget, saved_activation_bytes

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
FISHER_KINDS = ("empirical", "true")


class UnsupportedLossError(HessianToolsError, ValueError):
    """A loss whose Hessian on the outputs the Gauss–Newton/Fisher operators do not know."""


def loss_name(loss_fn) -> str:
    """``"cross_entropy"`` or ``"mse"`` for the batch-mean losses these operators support, else a
    one-line :class:`UnsupportedLossError`.
    """
    if isinstance(loss_fn, str) and loss_fn in LOSSES:
        return loss_fn
    for name, function in LOSSES.items():
        if loss_fn is function:
            return name
    module_types = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
    for name, module_type in module_types.items():
        if isinstance(loss_fn, module_type):
            plain = loss_fn.reduction == "mean" and getattr(loss_fn, "weight", None) is None
            if plain and getattr(loss_fn, "label_smoothing", 0.0) == 0.0:
                return name
            raise UnsupportedLossError(
                f"{type(loss_fn).__name__} must use reduction='mean' without class weights or label smoothing"
            )
    shown = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise UnsupportedLossError(
        f"the Gauss-Newton/Fisher operators support cross-entropy and MSE (F.cross_entropy, F.mse_loss, "
        f"nn.CrossEntropyLoss(), nn.MSELoss(), 'cross_entropy', 'mse'), not {shown}"
    )


# ---------------------------------------------------------------------------------- output factors
def flat_outputs(z: torch.Tensor, loss: str) -> torch.Tensor:
    """The outputs as (n, C): logits must already be (n, C); MSE outputs are flattened per sample."""
    if loss == "cross_entropy":
        if z.ndim != 2:
            raise UnsupportedLossError(
                f"cross-entropy needs outputs of shape (n, classes), got {tuple(z.shape)}"
            )
        return z
    return z.reshape(z.shape[0], -1)


def loss_gradient(z: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """r_n = ∇_z ℓ(z_n, y_n) for every sample, (n, C): p − onehot(y) (or p − y for probability
    targets) for cross-entropy, (2/C)(z − y) for MSE.
    """
    if loss == "mse":
        return 2.0 * (z - targets.reshape(z.shape).to(z.dtype)) / z.shape[1]
    probs = torch.softmax(z, dim=1)
    if targets.dtype.is_floating_point:
        return probs - targets.to(z.dtype)
    return probs - F.one_hot(targets.long(), z.shape[1]).to(z.dtype)


def ggn_factors(z: torch.Tensor, loss: str) -> torch.Tensor:
    """(n, C, C) factors a with Σ_r a_r a_rᵀ = Λ_n = ∇²_z ℓ: rows √p_c (e_c − p) for cross-entropy
    (Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − ppᵀ), √(2/C)·I for MSE.
    """
    n, C = z.shape
    eye = torch.eye(C, dtype=z.dtype, device=z.device).expand(n, C, C)
    if loss == "mse":
        return eye * math.sqrt(2.0 / C)
    probs = torch.softmax(z, dim=1)
    return probs.sqrt()[:, :, None] * (eye - probs[:, None, :])


def sampled_gradient_factors(
    z: torch.Tensor, loss: str, samples: int, generator: torch.Generator
) -> torch.Tensor:
    """(n, M, C) rows r̃_m/√M, r̃_m = ∇_z ℓ(z, ỹ_m) for labels ỹ_m drawn from the model's predictive
    distribution (categorical softmax(z); Gaussian N(z, (C/2)·I) for MSE).
    """
    n, C = z.shape
    if loss == "mse":
        noise = torch.randn(n, samples, C, generator=generator, dtype=torch.float64).to(z)
        rows = -(2.0 / C) * math.sqrt(C / 2.0) * noise  # (2/C)(z − ỹ), ỹ = z + σ·noise
    else:
        probs = torch.softmax(z, dim=1)
        labels = torch.multinomial(
            probs.detach().double().cpu(), samples, replacement=True, generator=generator
        )
        rows = probs[:, None, :] - F.one_hot(labels.to(z.device), C).to(z.dtype)
    return rows / math.sqrt(samples)


# ---------------------------------------------------------------------------------- the operators
def add_batch_dim(inputs: Any) -> Any:
    """One sample's inputs (inside a vmap over samples) with a batch dimension of one put back."""
    if isinstance(inputs, Mapping):
        return {k: add_batch_dim(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(add_batch_dim(v) for v in inputs)
    return inputs.unsqueeze(0) if isinstance(inputs, torch.Tensor) else inputs


class OutputCurvatureOperator(LinearOperator):
    """A = (1/N) Σ_n J_nᵀ M_n J_n for output factors of M_n given by :meth:`output_factors` (see the
    module docstring). Parameters as for
    :class:`~hessian_tools.operators.hessian.HessianOperator` (``mode`` must be ``"eval"``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data: Any,
        params=None,
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = DEFAULT_CHUNK,
        max_batch_size: int | None = None,
        memory_budget: int | str | None = "auto",
    ):
        loss = loss_name(loss_fn)
        risk = EmpiricalRisk(
            model,
            LOSSES[loss] if isinstance(loss_fn, str) else loss_fn,
            data,
            params,
            mode=mode,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
        )
        self._attach(risk, chunk_size, memory_budget)

    @classmethod
    def from_risk(
        cls,
        risk: EmpiricalRisk,
        chunk_size: int | None = DEFAULT_CHUNK,
        memory_budget: int | str | None = "auto",
        **options,
    ):
        """The operator over an existing data loop (e.g. a HessianOperator's ``risk``): same model,
        loss, data, parameters, dtype and device (and micro-batches, when a budget asks for them).
        """
        op = cls.__new__(cls)
        op._configure(**options)
        op._attach(risk, chunk_size, memory_budget)
        return op

    def _configure(self, **options) -> None:
        if options:
            raise TypeError(f"unexpected options {sorted(options)}")

    def _attach(self, risk: EmpiricalRisk, chunk_size: int | None, memory_budget="auto") -> None:
        if risk.mode != "eval":
            raise ValueError("Gauss-Newton and Fisher operators need independent samples: use mode='eval'")
        self.loss = loss_name(risk.loss_fn)
        self.risk = risk
        self.chunk_size = None if chunk_size is None else check_integer("chunk_size", chunk_size)
        self.dim, self.dtype, self.device = risk.dim, risk.dtype, risk.device
        self.blocks, self.param_names = risk.blocks, risk.param_names
        self.hvps = 0
        self.passes = 0
        #: how J·V is computed: "jvp" (forward mode), or "vjp-transpose" once forward mode failed
        self.push_strategy = "jvp"
        #: the chunk (and micro-batches) under the memory budget, as for HessianOperator
        self.planner = ChunkPlanner(
            resolve_budget(memory_budget, risk.device), risk, self.chunk_size, self._planned, self._estimate
        )

    @property
    def memory_plan(self):
        """The :class:`~hessian_tools.operators.memory.MemoryPlan` of the latest product (None before one)."""
        return self.planner.plan

    def _planned(self, path, inputs, targets, index, V, chunk) -> torch.Tensor:
        params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
        return self._batch_product(params, fixed, inputs, targets, V, index, chunk)

    def _estimate(self, inputs, targets) -> tuple[int, int]:
        """(fixed, per column) bytes where no peak reading exists: twice the activations the
        forward pass saves, and per column twice again plus four parameter-sized buffers.
        """
        params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
        for p in params.values():
            p.requires_grad_(True)
        saved = saved_activation_bytes(lambda: self._outputs_fn(fixed, inputs)(params))
        column = self.planner.column_bytes
        return 2 * saved + 2 * column, 2 * saved + 4 * column

    @property
    def num_samples(self) -> int:
        return self.risk.num_samples

    def output_factors(self, z: torch.Tensor, targets: torch.Tensor, index: int) -> torch.Tensor:
        """(n, R, C) rows a_nr of the factor of M_n for a batch's flat outputs z (n, C)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ products
    def _outputs_fn(self, fixed, inputs) -> Callable:
        model = self.risk.model
        return lambda p: model_output(functional_model_call(model, {**fixed, **p}, inputs))

    def _batch_product(
        self, params, fixed, inputs, targets, V: torch.Tensor, index: int, chunk: int | None = None
    ) -> torch.Tensor:
        """(1/n_b) Σ_{n∈b} J_nᵀ M_n J_n V for one batch, (dim, K), ``chunk`` columns per vmap."""
        names, K = self.param_names, V.shape[1]
        outputs_of = self._outputs_fn(fixed, inputs)
        z, pullback = vjp(outputs_of, params)
        check_finite(z, index, "network output")
        z_flat = flat_outputs(z.detach(), self.loss)
        factors = self.output_factors(z_flat, targets, index)  # (n, R, C)
        cols = [V[b.slice].T.reshape(K, *b.shape) for b in self.blocks]
        JV = self._push_forward(outputs_of, params, pullback, z, cols, chunk).reshape(K, *z_flat.shape)
        coefficients = torch.einsum("nrc,knc->knr", factors, JV)
        back = torch.einsum("nrc,knr->knc", factors, coefficients) / z_flat.shape[0]

        def pull(u):
            (g,) = pullback(u.reshape(z.shape))
            return tuple(g[n] for n in names)

        pulled = vmap(pull, chunk_size=chunk)(back)
        return torch.cat([h.reshape(K, -1) for h in pulled], dim=1).T

    def _push_forward(self, outputs_of, params, pullback, z, cols, chunk: int | None) -> torch.Tensor:
        """(K, *z.shape): J·v for every column, by forward mode (``jvp``); for a model without
        forward-mode rules, by the transpose of the pull-back (J v = ∂/∂u ⟨Jᵀu, v⟩, reverse over reverse).
        """
        names = self.param_names
        if self.push_strategy == "jvp":
            try:
                push = lambda *c: jvp(outputs_of, (params,), (dict(zip(names, c)),))[1]  # noqa: E731
                return vmap(push, chunk_size=chunk)(*cols)
            except (NotImplementedError, RuntimeError):  # no forward-mode rule for some operation
                self.push_strategy = "vjp-transpose"
        _, transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(z))
        push = lambda *c: transpose(dict(zip(names, c)))[0]  # noqa: E731
        return vmap(push, chunk_size=chunk)(*cols)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        chunk = self.planner.chunk("func", V.shape[1])
        with self.risk.computation_mode():
            params, fixed = self.risk.parameter_values(), self.risk.fixed_state()

            def product(index, inputs, targets):
                return self._batch_product(params, fixed, inputs, targets, V, index, chunk)

            mean = self.risk.weighted_mean(product, (self.dim, V.shape[1]), f"{type(self).__name__} product")
        if self.device.type == "cpu":
            release_freed_memory()
        self.passes += 1
        return mean.to(self.dtype)

    # ------------------------------------------------------------------ exact trace
    def exact_trace(self, sample_chunk: int = 16) -> tuple[torch.Tensor, int]:
        """(per-block traces tr(A_bb) in float64, R): tr(A) = (1/N) Σ_n Σ_r ‖J_nᵀ a_nr‖², by R
        per-sample vector-Jacobian products per sample (``sample_chunk`` samples vmapped at once).
        """
        check_integer("sample_chunk", sample_chunk)
        zero = torch.zeros(len(self.blocks), dtype=torch.float64)
        rows = [0]
        with self.risk.computation_mode():
            params, fixed = self.risk.parameter_values(), self.risk.fixed_state()

            def per_batch(index, inputs, targets):
                with torch.no_grad():
                    z = model_output(functional_model_call(self.risk.model, {**fixed, **params}, inputs))
                factors = self.output_factors(flat_outputs(z, self.loss), targets, index)
                rows[0] = max(rows[0], factors.shape[1])
                sums = self._per_sample_squared_norms(params, fixed, inputs, factors, sample_chunk)
                return sums.sum(0) / factors.shape[0]

            total, count = self.risk.weighted_sum(per_batch, zero, "Gauss-Newton trace")
        self.passes += 1
        return total / count, rows[0]

    def _per_sample_squared_norms(self, params, fixed, inputs, factors, sample_chunk: int) -> torch.Tensor:
        """(n, n_blocks): Σ_r ‖(J_nᵀ a_nr)_b‖² for each sample n and parameter block b."""
        names, model = self.param_names, self.risk.model

        def one_sample(x, rows):
            def output(p):
                return model_output(functional_model_call(model, {**fixed, **p}, add_batch_dim(x))).reshape(
                    -1
                )

            _, pullback = vjp(output, params)
            (g,) = vmap(pullback)(rows)
            return torch.stack([g[n].pow(2).sum() for n in names])

        return vmap(one_sample, chunk_size=sample_chunk)(inputs, factors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, loss={self.loss!r}, dtype={self.dtype})"


class GGNOperator(OutputCurvatureOperator):
    """The generalized Gauss–Newton matrix G = (1/N) Σ_n J_nᵀ ∇²_z ℓ(z_n, y_n) J_n (module docstring).

    Parameters
    ----------
    model, loss_fn, data, params, mode, dtype, device, chunk_size, max_batch_size, memory_budget: as
        for :class:`~hessian_tools.operators.hessian.HessianOperator`; ``loss_fn`` is cross-entropy or
        MSE (batch mean), ``mode`` must be ``"eval"``.
    """

    def output_factors(self, z, targets, index):
        return ggn_factors(z, self.loss)


class FisherOperator(OutputCurvatureOperator):
    """The Fisher matrix: ``kind="empirical"`` (1/N) Σ_n g_n g_nᵀ with per-sample gradients g_n, or
    ``kind="true"`` (the expectation over the model's predictive distribution: equal to the GGN, or
    its Monte-Carlo estimate with ``mc_samples`` labels per sample drawn from ``seed``).

    Parameters
    ----------
    model, loss_fn, data, params: as for :class:`GGNOperator`.
    kind: ``"empirical"`` or ``"true"``.
    mc_samples: for ``kind="true"``: ``None`` (the exact expectation) or the number M of sampled
        labels per sample.
    seed: the seed of the sampled labels (``None``: drawn and recorded in ``self.seed``); labels of
        batch b come from a generator seeded by (seed, b), so every product uses the same labels.
    **options: ``mode``, ``dtype``, ``device``, ``chunk_size``, ``max_batch_size``, ``memory_budget``
        as for :class:`GGNOperator`.
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        kind: str = "empirical",
        mc_samples: int | None = None,
        seed: int | None = 0,
        **options,
    ):
        self._configure(kind=kind, mc_samples=mc_samples, seed=seed)
        super().__init__(model, loss_fn, data, params, **options)

    def _configure(
        self, kind: str = "empirical", mc_samples: int | None = None, seed: int | None = 0
    ) -> None:
        self.kind = check_choice("kind", kind, FISHER_KINDS)
        if mc_samples is not None and kind != "true":
            raise ValueError(
                "mc_samples applies to kind='true' only (the empirical Fisher uses the data's labels)"
            )
        self.mc_samples = None if mc_samples is None else check_integer("mc_samples", mc_samples)
        self.seed = resolve_seed(seed) if self.mc_samples is not None else None

    def output_factors(self, z, targets, index):
        if self.kind == "empirical":
            return loss_gradient(z, targets.to(z.device), self.loss)[:, None, :]
        if self.mc_samples is None:
            return ggn_factors(z, self.loss)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % MAX_SEED)
        return sampled_gradient_factors(z, self.loss, self.mc_samples, generator)

    def __repr__(self) -> str:
        extra = f", mc_samples={self.mc_samples}, seed={self.seed}" if self.mc_samples else ""
        return f"FisherOperator(dim={self.dim}, kind={self.kind!r}, loss={self.loss!r}{extra})"
