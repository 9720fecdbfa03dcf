"""Quick start: the Hessian of a small CNN trained on the shipped digits, with error bars."""
import torch

import hessian_tools as ht
from hessian_tools.app.zoo.data import batches, load_data
from hessian_tools.app.runs import TrainConfig, build_run_model, train

run = train(TrainConfig(model="cnn", data="builtin:digits", epochs=5, lr=0.05, seed=0), "runs/quickstart-cnn", resume=True)
model = build_run_model(run, "final.pt")
X, y = load_data("builtin:digits").train
op = ht.HessianOperator(model, torch.nn.functional.cross_entropy, batches(X, y, 512))  # 3×512 + 413 samples
print(op)

t = ht.trace(op, rtol=0.01, seed=0)  # Hutch++, stops at 95% half-width ≤ 1%
lo, hi = t.ci95
print(f"trace {t.estimate:.4f}  95% CI [{lo:.4f}, {hi:.4f}]  ({t.hvps} HVPs, seed {t.seed}, converged {t.converged})")
print("largest block traces:", sorted(((b.name, round(b.estimate, 3)) for b in t.blocks), key=lambda x: -x[1])[:2])

top = ht.eigenvalues(op, k=3, which="LA", tol=1e-6)
bottom = ht.eigenvalues(op, k=1, which="SA", tol=1e-6)
print("top-3 eigenvalues", top.values.round(6), "residuals", top.residuals, f"({top.hvps} HVPs)")
print("smallest eigenvalue", bottom.values.round(6), f"({bottom.hvps} HVPs)")

d = ht.density(op, n_probes=8, steps=40, seed=0)
print(f"SLQ density: {d.n_probes} probes × {d.steps} steps; its trace estimate {d.moments['trace']:.3f} ± "
      f"{1.96 * d.moments['trace_stderr']:.3f}")
print(t.to_json()[:120], "...")
