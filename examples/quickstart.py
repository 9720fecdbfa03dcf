"""Quick start: the Hessian of your own small CNN, trained on the shipped digits, with error bars.

Only the data comes from the package's zoo; the model and its training are plain PyTorch, and the
curvature comes from the library (``hessian_tools``): operator → estimators → results.
"""

import torch
from torch import nn

import hessian_tools as ht
from hessian_tools.app.zoo.data import load_digits

torch.manual_seed(0)
X, y = load_digits()  # 1,797 images 1×8×8, labels 0–9
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64, 10),
)  # fmt: skip
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(60):  # full-batch Adam: a trained network with the usual few large curvature outliers
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    optimizer.step()

# 3×512 + 261 samples: an uneven last batch is weighted exactly
data = [(X[i : i + 512], y[i : i + 512]) for i in range(0, len(y), 512)]
# float64: tight eigenvalue tolerances
op = ht.HessianOperator(model, nn.functional.cross_entropy, data, dtype=torch.float64)
print(op)

t = ht.trace(op, rtol=0.01, seed=0)  # stops at 95% half-width ≤ 1%
lo, hi = t.ci95
print(f"trace {t.estimate:.4f}  95% CI [{lo:.4f}, {hi:.4f}]  ({t.hvps} HVPs, {t.method}, seed {t.seed})")
print(
    "largest block traces:",
    sorted(((b.name, round(b.estimate, 3)) for b in t.blocks), key=lambda x: -x[1])[:2],
)

top = ht.eigenvalues(op, k=3, which="LA", tol=1e-6)
bottom = ht.eigenvalues(op, k=1, which="SA", tol=1e-6)
print("top-3 eigenvalues", top.values.round(6), "residuals", top.residuals, f"({top.hvps} HVPs)")
print("smallest eigenvalue", bottom.values.round(6), f"({bottom.hvps} HVPs)")

d = ht.density(op, n_probes=8, steps=40, seed=0)
print(
    f"SLQ density: {d.n_probes} probes × {d.steps} steps; its trace estimate {d.moments['trace']:.3f} ± "
    f"{1.96 * d.moments['trace_stderr']:.3f}"
)

s = ht.noise_stability(model, nn.functional.cross_entropy, data, sigma=1e-2, n_samples=32, seed=0)
print(
    f"noise stability at σ=0.01: {s.estimate:.4g} ± {1.96 * s.stderr:.2g} "
    f"(σ²/2·Tr H = {1e-4 / 2 * t.estimate:.4g})"
)
print(t.to_json()[:120], "...")
