"""XTrace (Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024).

Hutch++ spends its probes on two separate jobs: a sketch Q that captures the top of the spectrum,
and Hutchinson probes for the rest. XTrace uses every probe for both jobs (the *exchangeability*
principle). With s = ⌊max_hvps/2⌋ probes Ω = [ω_1 … ω_s] and Y = HΩ:

* for each i, Q_(i) = orth(Y without column i) — a rank-(s−1) sketch that does not depend on ω_i;
* estimate_i = tr(Q_(i)ᵀ H Q_(i)) + ω̃_iᵀ (I − Q_(i)Q_(i)ᵀ) H (I − Q_(i)Q_(i)ᵀ) ω̃_i,
  the exact trace on the sketch plus a one-probe Hutchinson estimate of the residual, with the
  probe ω_i that was left out of the sketch;
* the estimate is the mean of the s estimate_i.

Efficient leave-one-out (the paper's downdating): with the thin QR Y = QR, span(Y without
column i) = Q·span{r_j : j ≠ i}, whose orthogonal complement inside span(Q) is the unit vector
Q s_i with s_i = R⁻ᵀe_i/‖R⁻ᵀe_i‖. Hence Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, and with Z = HQ,
W = QᵀΩ, c_i = (I − s_i s_iᵀ)w_i, u_i = (I − Q_(i)Q_(i)ᵀ)ω_i = ω_i − Qc_i and
Hu_i = y_i − Zc_i, every term comes from Y and Z: one QR, one triangular solve and O(dim·s²)
work — no s separate QRs and no further HVPs. Total cost: 2s HVPs (HΩ and HQ), two data passes.

Probes: the paper's "improved" estimator. ω_i are Gaussian columns scaled to norm √dim (uniform
on the sphere of radius √dim), and the residual term uses the probe renormalised inside the
(dim − s + 1)-dimensional range of I − Q_(i)Q_(i)ᵀ:

    ω̃ᵢ-term = (dim − s + 1) · u_iᵀ H u_i / ‖u_i‖².

Because Ω is rotation-invariant and ω_i is independent of Q_(i), u_i/‖u_i‖ is uniform on the unit
sphere of that range, so E[(dim − s + 1)·ûûᵀ] = I − Q_(i)Q_(i)ᵀ: each estimate_i — hence the
mean — is unbiased, and the residual probe has no spread in its length (the variance of a
spherical probe is below that of a Gaussian or Rademacher one). Rademacher probes are not
rotation-invariant, so this renormalisation would bias them; that is why Gaussian/spherical
probes are used. (The column scaling of Ω changes neither the sketches nor the renormalised term.)

Error estimate (``stderr``). The paper's estimate, std(estimate_1..s)/√s (``error_bar=
"exchangeable"``), treats the estimate_i as independent; they are exchangeable but positively
correlated (they share s − 2 sketch columns), so it runs small: on exact Hessians and dense
spectra its 95% interval covered the truth in only 79–95% of 200 seeds (decaying spectra ≈ 85–89%
even at s = 32). The default (``error_bar="jackknife"``) is the jackknife over probes: with T_(j)
the XTrace estimate from the s − 1 probes other than ω_j (:meth:`XTraceSketch.leave_one_probe_out`,
no extra HVP),

    stderr² = (s − 1)/s · Σ_j (T_(j) − mean_j T_(j))².

By the Efron–Stein inequality its expectation is at least the variance of XTrace with s − 1
probes, which is at least that with s: the bar is conservative (measured 92–100% coverage, 100%
on fast-decaying spectra where it is 2–3× the actual error), never small by design. Both are 0 when
the estimate is exact, e.g. when rank(H) ≤ s − 2 (every leave-two-out sketch spans range(H)).
Per-block stderrs are the exchangeable ones times the total's jackknife/exchangeable ratio.

Adaptive XTrace (``rtol``; :func:`xtrace`): the sketch grows in stages (:class:`XTraceSketch`;
every HVP is reused, a stage costs two data passes) until 1.96·stderr ≤ rtol·|estimate| or the
next stage would exceed ``max_hvps``. The next stage size is predicted from the error decay seen
so far, stderr ∝ s^(−a) with a measured between the last two stages (clamped to [0.5, 1.5]; 1 at
the first stage), and clipped to [s + 2, 2s] probes, so the overshoot is at most 2×.

When s ≥ dim the trace is computed exactly as tr(H·I) with dim HVPs (stderr 0, no probes).

Per-block traces (``blocks``): per coordinate k, estimate_i splits as
(Q_(i)Q_(i)ᵀH)_kk + (dim − s + 1)·(u_i)_k (Hu_i)_k/‖u_i‖². For symmetric H, diag(PH) = diag(HP) for
symmetric P, and E[ûûᵀ]·(dim − s + 1) = I − P, so the expected per-coordinate parts sum to
diag(PH) + diag(H(I − P)) = diag(H): summing over a block's coordinates gives an unbiased estimate
of tr(H_bb) from the same probes and HVPs, and the block estimates sum exactly to the total.
Their stderr is computed the same way as the total's.

XDiag (the same paper, its diagonal estimator; :func:`xdiag`). The same exchangeable design for
diag(H), with s = ⌊max_hvps/2⌋ Rademacher probes Ω, Y = HΩ = QR and Z = HQ:

    d_i = diag(Q_(i)Q_(i)ᵀH) + ω_i ⊙ (I − Q_(i)Q_(i)ᵀ)Hω_i,     estimate = (1/s) Σ_i d_i.

Each d_i is unbiased (ω_i is independent of Q_(i) and E[ω_i ω_iᵀ] = I): the diagonal of the
rank-(s−1) part exactly, plus a one-probe Hutchinson diagonal estimate of the residual
(I − Q_(i)Q_(i)ᵀ)H. With the downdating above, Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, so

    diag(Q_(i)Q_(i)ᵀH) = diag(QQᵀH) − (Qs_i) ⊙ (Zs_i),
    (I − Q_(i)Q_(i)ᵀ)Hω_i = y_i − Qt_i + Qs_i (s_iᵀt_i),   t_i = QᵀHω_i (T = ZᵀΩ),

again from Y and Z alone: 2s HVPs in all. Probes are Rademacher, as in the paper: for the diagonal
their z_i² = 1 removes the H_ii² term a Gaussian probe would add to each coordinate's variance (no
renormalisation is needed, unlike XTrace's spherical probes). When rank(H) ≤ s − 1 every Q_(i) spans
range(H) and the estimate is exact.

XDiag's error estimate (``stderr``): per coordinate, std(d_1..s)/√s, the analogue of XTrace's; like
it, an estimate of the whole error from exchangeable, dependent samples, not a textbook standard
error; the tests check its coverage against exact diagonals. Measured: on the Hessians of the small
CNN and ResNet it matches the actual error (68–70% of coordinates within one stderr, 99% within
three; analysis/diagonal_accuracy.py); on a dense matrix with five outliers and a flat bulk it runs
about 20% small (58% within one stderr, 98% within three). Block sums and the trace get theirs
from the per-probe block sums of the d_i. When ``max_hvps ≥ dim`` the diagonal is computed
exactly as diag(H·I) with dim HVPs.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..checks import check_choice, check_integer
from ..results import Z95, DiagonalResult, TraceResult
from ..seeding import seeded_generator
from ..stats import mean_and_stderr
from .common import CountingOperator, block_index, block_sums, check_rtol
from .diagonal import CoordinateMoments, diagonal_result, exact_diagonal
from .hutchinson import block_results
from .probes import gaussian, rademacher

ERROR_BARS = ("jackknife", "exchangeable")


def xtrace(
    op,
    *,
    max_hvps: int | None = None,
    rtol: float | None = None,
    min_probes: int = 8,
    error_bar: str = "jackknife",
    seed: int | None = 0,
    keep_samples: bool = True,
) -> TraceResult:
    """Estimate tr(H) by XTrace; see the module docstring.

    Fixed budget (``rtol`` None): s = ⌊max_hvps/2⌋ probes, 2s HVPs (max_hvps default 100).
    Adaptive (``rtol`` given): start with ``min_probes`` probes and grow the sketch until the 95%
    half-width 1.96·stderr ≤ rtol·|estimate| or max_hvps (default 1000) is reached; ``converged``
    says which. ``error_bar``: ``"jackknife"`` (default, conservative) or ``"exchangeable"`` (the
    paper's std/√s).
    """
    rtol = check_rtol(rtol)
    max_hvps = check_integer("max_hvps", (100 if rtol is None else 1000) if max_hvps is None else max_hvps, 4)
    check_integer("min_probes", min_probes, 3)
    check_choice("error_bar", error_bar, ERROR_BARS)
    H = CountingOperator(op)
    s = max_hvps // 2
    if rtol is None and s >= H.dim:  # exact: the budget covers the whole space
        return _exact_trace(H, seed)
    generator, seed = seeded_generator(seed)
    sketch = XTraceSketch(H, generator, capacity=min(s, H.dim))  # rows never reached are never touched
    if rtol is None:
        sketch.grow(s)
        return sketch.result(seed, error_bar=error_bar, keep_samples=keep_samples)
    return _grow_until(sketch, rtol, min(s, H.dim), min_probes, error_bar, seed, keep_samples)


def _grow_until(
    sketch: XTraceSketch, rtol: float, most: int, min_probes: int, error_bar: str, seed, keep_samples: bool
) -> TraceResult:
    """The adaptive loop: stages of probes until the half-width meets rtol or ``most`` probes."""
    history = []  # (probes, stderr) after each stage
    sketch.grow(min(min_probes, most))
    while True:
        estimate, stderr = sketch.estimate_and_stderr(error_bar)
        target = rtol * abs(estimate)
        done = Z95 * stderr <= target
        if done or sketch.probes >= most:
            return sketch.result(
                seed, error_bar=error_bar, keep_samples=keep_samples, rtol=rtol, converged=done
            )
        history.append((sketch.probes, stderr))
        sketch.grow(_next_stage(history, target / Z95, most))


def _next_stage(history, target_stderr: float, most: int) -> int:
    """Probes to add: enough for stderr ∝ s^(−a) to reach the target, within [2, s] and the budget."""
    s, stderr = history[-1]
    rate = 1.0
    if len(history) > 1 and stderr > 0 and history[-2][1] > 0:
        (s0, e0) = history[-2]
        rate = min(max(math.log(e0 / stderr) / math.log(s / s0), 0.5), 1.5)
    wanted = s * (stderr / target_stderr) ** (1 / rate) if target_stderr > 0 else 2 * s
    return max(1, min(max(math.ceil(wanted) - s, 2), s, most - s))


class XTraceSketch:
    """The XTrace state — probes Ω, Y = HΩ = QR and Z = HQ — grown in stages without wasting an HVP.

    Adding k probes Ω′ costs 2k HVPs: Y′ = HΩ′, then the QR of [Y, Y′] and Z′ = HQ′ for its k new
    columns Q′. The old columns of Q — hence Z = HQ — are unchanged (up to rounding: Q is the latest
    QR's), because the first j columns of a Householder QR depend only on the first j columns of the
    matrix. After any stage the estimate is exactly that of a fixed-budget XTrace with the same probes
    (:meth:`samples`, :meth:`parts`).

    Ω, Y and Z are stored as the rows of buffers of ``capacity`` rows (grown when a stage needs more),
    so a stage writes only its new columns: no copy of the old ones, and the pages of rows never
    written are never touched. The s × s projections every estimate needs (QᵀΩ, QᵀY, QᵀZ, ΩᵀZ and the
    probes' ωᵢᵀyᵢ, ‖ωᵢ‖²) are computed once per stage; from them the estimates and the jackknife
    take s-dimensional arithmetic only, and the dim-sized per-coordinate parts are formed (in chunks of
    rows) only for per-block traces.
    """

    def __init__(self, H: CountingOperator, generator: torch.Generator, capacity: int = 0):
        self.H, self.generator = H, generator
        self._rows = torch.empty(3, max(int(capacity), 0), H.dim, dtype=torch.float64, device=H.device)
        self._s = 0
        self.Q = torch.zeros(H.dim, 0, dtype=torch.float64, device=H.device)
        self.R = torch.zeros(0, 0, dtype=torch.float64, device=H.device)
        self.omega_y = torch.zeros(0, dtype=torch.float64, device=H.device)  # ω_iᵀy_i
        self.omega_omega = torch.zeros(0, dtype=torch.float64, device=H.device)  # ‖ω_i‖²
        self._project()

    @property
    def probes(self) -> int:
        return self._s

    @property
    def Omega(self) -> torch.Tensor:
        return self._rows[0, : self._s].T

    @property
    def Y(self) -> torch.Tensor:
        return self._rows[1, : self._s].T

    @property
    def Z(self) -> torch.Tensor:
        return self._rows[2, : self._s].T

    def grow(self, k: int) -> None:
        """Add k spherical probes (columns of norm √dim): two data passes, 2k HVPs."""
        n, old = self.H.dim, self.probes
        new = gaussian(n, k, self.generator)
        factor = math.sqrt(n) / new.norm(dim=0)
        if old + k > self._rows.shape[1]:  # a larger buffer (only when the capacity was too small)
            rows = torch.empty(
                3, max(old + k, 2 * self._rows.shape[1]), n, dtype=torch.float64, device=self.H.device
            )
            rows[:, :old] = self._rows[:, :old]
            self._rows = rows
        omega, y = self._rows[0, old : old + k], self._rows[1, old : old + k]
        omega.copy_(new.T).mul_(factor[:, None].to(omega.device))  # the probes, scaled to norm √dim
        del new
        y.copy_(self.H.matmat(omega.T).T)
        self._s = old + k
        dots = [torch.dot(a, b) for a, b in zip(omega, y)] + [torch.dot(a, a) for a in omega]
        dots = torch.stack(dots).to(torch.float64)
        self.omega_y = torch.cat([self.omega_y, dots[:k]])
        self.omega_omega = torch.cat([self.omega_omega, dots[k:]])
        self.Q = None  # the old Q is not needed by the QR: free it first
        self.Q, self.R = torch.linalg.qr(self.Y)
        self._rows[2, old : self._s] = self.H.matmat(self.Q[:, old:]).T
        self._project()

    def _project(self) -> None:
        """The s × s projections of one stage (see the class docstring)."""
        Q, Omega, Y, Z = self.Q, self.Omega, self.Y, self.Z
        self.W, self.Rm, self.M, self.P = Q.T @ Omega, Q.T @ Y, Q.T @ Z, Omega.T @ Z

    def _downdated(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S (column i: s_i), C (column i: c_i = (I − s_i s_iᵀ) w_i) and the residual scales
        (dim − s + 1)/‖u_i‖², ‖u_i‖² = ‖ω_i‖² − 2 w_iᵀc_i + ‖c_i‖² (QᵀQ = I).
        """
        n, s = self.H.dim, self.probes
        S = _leave_one_out_directions(self.R)  # column i: unit s_i ⟂ r_j (j ≠ i)
        C = self.W - S * (S * self.W).sum(0)
        uu = self.omega_omega - 2 * (self.W * C).sum(0) + (C * C).sum(0)
        return S, C, (n - s + 1) / uu.clamp_min(torch.finfo(torch.float64).tiny)

    def parts(self, index: torch.Tensor | None = None, n_blocks: int = 0) -> torch.Tensor:
        """(dim, s): column i holds the per-coordinate parts of estimate_i (they sum to it):
        diag(Q_(i)Q_(i)ᵀH) + (dim − s + 1)·u_i ⊙ Hu_i / ‖u_i‖² (module docstring). With a block
        ``index`` (dim,) of ``n_blocks`` blocks: their sums over each block's coordinates, (n_blocks, s),
        without forming the dim × s parts (they are computed in chunks of rows).
        """
        S, C, scale = self._downdated()
        Q, Z, Omega, Y = self.Q, self.Z, self.Omega, self.Y
        out = (
            torch.empty(self.H.dim, self.probes, dtype=torch.float64, device=Q.device)
            if index is None
            else torch.zeros(n_blocks, self.probes, dtype=torch.float64, device=Q.device)
        )
        for start in range(0, self.H.dim, _PART_ROWS):
            rows = slice(start, start + _PART_ROWS)
            q, z = Q[rows], Z[rows]
            part = (q @ S).mul_(z @ S).neg_().add_((q * z).sum(1, keepdim=True))
            u = torch.addmm(Omega[rows], q, C, alpha=-1)  # u_i = (I − Q_(i)Q_(i)ᵀ) ω_i
            hu = torch.addmm(Y[rows], z, C, alpha=-1)  # H u_i
            part.add_(u.mul_(hu).mul_(scale))
            if index is None:
                out[rows] = part
            else:
                out.index_add_(0, index[rows], part)
        return out

    def samples(self) -> torch.Tensor:
        """The s leave-one-out estimates estimate_1..s (their mean is the XTrace estimate): the sums of
        :meth:`parts` over the coordinates, tr(M) − s_iᵀMs_i + (dim − s + 1)·u_iᵀHu_i/‖u_i‖² with
        M = QᵀZ and u_iᵀHu_i = ω_iᵀy_i − ω_iᵀZc_i − c_iᵀQᵀy_i + c_iᵀMc_i, from the s × s projections.
        """
        S, C, scale = self._downdated()
        M = self.M
        uHu = self.omega_y - (self.P.T * C).sum(0) - (C * self.Rm).sum(0) + (C * (M @ C)).sum(0)
        return torch.trace(M) - (S * (M @ S)).sum(0) + uHu * scale

    def leave_one_probe_out(self) -> torch.Tensor:
        """(s,): entry j is the XTrace estimate from the s − 1 probes other than ω_j (same sketch data).

        Its terms are leave-two-out: for probe i ≠ j the sketch is span{y_k : k ≠ i, j} = Q·(I − P_ij)
        with P_ij the projection onto span{s_i, s_j} (both ⟂ r_k for k ∉ {i, j}). With
        c = (I − P_ij)w_i, u = ω_i − Qc, Hu = y_i − Zc and M = QᵀZ = QᵀHQ,
            t_ij = tr(M) − tr(P_ij M) + (dim − s + 2)·uᵀHu/‖u‖²,
            uᵀHu = ω_iᵀy_i − 2 r_iᵀc + cᵀMc   (ZᵀΩ = QᵀY = R for symmetric H),   ‖u‖² = ‖ω_i‖² − ‖c‖²,
        all in s-dimensional arithmetic from the stage's projections: O(s³) work, no HVP. Entry j is
        mean_{i≠j} t_ij.
        """
        n, s = self.H.dim, self.probes
        S = _leave_one_out_directions(self.R)
        W, M, Rm = self.W, (self.M + self.M.T) / 2, self.Rm  # Rm = QᵀY = R up to rounding
        gamma = (S.T @ S).clamp(-1.0, 1.0)  # [j, i] = s_jᵀ s_i
        rho = (1 - gamma**2).clamp_min(1e-24).sqrt()
        alpha = S.T @ W  # [j, i] = s_jᵀ w_i
        own = torch.diagonal(alpha)[None, :]  # s_iᵀ w_i
        beta = (own - gamma * alpha) / rho  # v2ᵀw_i, v2 = (s_i − γ s_j)/ρ
        p, q = alpha - beta * gamma / rho, beta / rho  # c = w_i − p s_j − q s_i
        SMS, SMW, SR = S.T @ M @ S, S.T @ M @ W, S.T @ Rm
        d = torch.diagonal
        cc = (W * W).sum(0)[None, :] - alpha**2 - beta**2  # ‖c‖² = ‖w_i‖² − ‖P_ij w_i‖²
        rc = d(Rm.T @ W)[None, :] - p * SR - q * d(SR)[None, :]  # r_iᵀc
        cMc = (
            d(W.T @ M @ W)[None, :]
            - 2 * p * SMW
            - 2 * q * d(SMW)[None, :]
            + p**2 * d(SMS)[:, None]
            + 2 * p * q * SMS.T
            + q**2 * d(SMS)[None, :]
        )
        uHu = self.omega_y[None, :] - 2 * rc + cMc
        uu = (self.omega_omega[None, :] - cc).clamp_min(torch.finfo(torch.float64).tiny)
        trPM = d(SMS)[:, None] + (d(SMS)[None, :] - 2 * gamma * SMS + gamma**2 * d(SMS)[:, None]) / rho**2
        terms = torch.trace(M) - trPM + (n - s + 2) * uHu / uu  # [j, i]
        terms.fill_diagonal_(0.0)
        return terms.sum(1) / (s - 1)

    def estimate_and_stderr(self, error_bar: str = "jackknife") -> tuple[float, float]:
        """The XTrace estimate and its standard error (``error_bar``: module docstring)."""
        estimate, stderr = mean_and_stderr(self.samples())
        if self.probes >= self.H.dim:  # Q spans the space: every estimate_i is exactly tr(H)
            return estimate, 0.0
        return estimate, self._jackknife() if error_bar == "jackknife" else stderr

    def _jackknife(self) -> float:
        """√((s − 1)/s · Σ_j (T_(j) − mean T_(j))²) over the leave-one-probe-out estimates T_(j)."""
        leave_out = self.leave_one_probe_out()
        s = leave_out.numel()
        return math.sqrt((s - 1) / s * float(((leave_out - leave_out.mean()) ** 2).sum()))

    def result(
        self,
        seed,
        *,
        error_bar: str = "jackknife",
        keep_samples: bool = True,
        rtol=None,
        converged: bool = True,
    ) -> TraceResult:
        """The TraceResult of the current sketch (blocks from the per-coordinate parts)."""
        samples = self.samples()
        estimate, raw = mean_and_stderr(samples)
        _, stderr = self.estimate_and_stderr(error_bar)
        inflation = stderr / raw if raw > 0 else 1.0
        names, index = block_index(self.H.blocks, self.H.dim, device=self.H.device)
        blocks = block_results(self.H.blocks, self.parts(index, len(names))) if names is not None else ()
        blocks = tuple(dataclasses.replace(b, stderr=inflation * b.stderr) for b in blocks)
        return TraceResult(
            estimate=estimate,
            stderr=stderr,
            hvps=self.H.hvps,
            method="xtrace",
            seed=seed,
            n_probes=self.probes,
            rtol=rtol,
            converged=converged,
            blocks=blocks,
            samples=tuple(samples.tolist()) if keep_samples else (),
        )


#: rows of the dim × s matrices per chunk of :meth:`XTraceSketch.parts` (a few MB of temporaries at s ≈ 25)
_PART_ROWS = 1 << 14


def _exact_trace(H: CountingOperator, seed, method: str = "xtrace", rtol=None) -> TraceResult:
    """tr(H·I) with dim HVPs: the answer when the budget covers the whole space (stderr 0)."""
    Z = H.matmat(torch.eye(H.dim, dtype=torch.float64, device=H.device))
    diag = torch.diagonal(Z)[:, None]
    names, index = block_index(H.blocks, H.dim, device=H.device)
    blocks = ()
    if names is not None:
        zeros = torch.zeros(len(names), 2, dtype=torch.float64)
        blocks = block_results(H.blocks, zeros, block_sums(diag, index, len(names))[:, 0])
    return TraceResult(float(diag.sum()), 0.0, H.hvps, method, seed, 0, rtol, True, blocks, ())


def xdiag(op, *, max_hvps: int = 100, seed: int | None = 0, block_size: int = 16) -> DiagonalResult:
    """Estimate diag(H) by XDiag with s = ⌊max_hvps/2⌋ Rademacher probes (2s HVPs); see the module
    docstring. ``block_size`` bounds the memory of the per-probe estimates (columns at a time).
    """
    check_integer("max_hvps", max_hvps, 4)
    check_integer("block_size", block_size)
    H = CountingOperator(op)
    if max_hvps >= H.dim:
        return exact_diagonal(H, "xdiag", seed)
    s = max_hvps // 2
    generator, seed = seeded_generator(seed)
    Omega = rademacher(H.dim, s, generator, device=H.device)
    Y = H.matmat(Omega)
    Q, R = torch.linalg.qr(Y)
    Z = H.matmat(Q)
    S = _leave_one_out_directions(R)  # column i: unit s_i ⟂ r_j (j ≠ i)
    T = Z.T @ Omega  # t_i = QᵀHω_i
    sketched = (Q * Z).sum(1, keepdim=True)  # diag(QQᵀH)
    weights = (S * T).sum(0)  # s_iᵀt_i
    moments = CoordinateMoments(H)
    for start in range(0, s, block_size):
        cols = slice(start, min(start + block_size, s))
        QS, ZS = Q @ S[:, cols], Z @ S[:, cols]
        residual = Y[:, cols] - Q @ T[:, cols] + QS * weights[cols]  # (I − Q_(i)Q_(i)ᵀ)Hω_i
        moments.add(sketched - QS * ZS + Omega[:, cols] * residual)
    return diagonal_result(moments, H, "xdiag", seed, sketch=s)


def _leave_one_out_directions(R: torch.Tensor) -> torch.Tensor:
    """Columns of R⁻ᵀ normalised to unit length: s_i is orthogonal to every column r_j, j ≠ i.

    Exactly zero pivots (H = 0, or exactly dependent columns of Y) are lifted to a tiny value so
    that the solve stays finite; the leave-one-out spaces then still contain range(Y).
    """
    s = R.shape[0]
    diag = torch.diagonal(R)
    largest = float(R.abs().max())
    floor = torch.finfo(R.dtype).eps * largest if largest > 0 else 1.0
    small = diag.abs() < floor
    if bool(small.any()):
        R = R.clone()
        fixed = torch.where(diag < 0, -floor, floor)
        R.diagonal().copy_(torch.where(small, fixed, diag))
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    Rinv_T = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return Rinv_T / Rinv_T.norm(dim=0)
