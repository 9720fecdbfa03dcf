"""Over-parameterised matrix sensing: GD vs weight-perturbed GD vs NSO (the NSO paper's first experiment).

    python analysis/matrix_sensing.py --seeds 0 1 2 --steps 5000 --out figures

(also ``hessian-tools matrix-sensing``) writes ``figures/matrix_sensing.json`` — per seed and
method the relative train/validation loss every ``--log-every`` steps, the final losses, the exact
Hessian trace of the final U and the wall time, plus a per-method summary next to the paper's
reported validation losses — and ``figures/matrix_sensing.png``/``.pdf`` (training and validation
loss vs step, log scale, mean over seeds with a min–max band). The set-up, and why the training
objective is the half-MSE while the reported losses are relative, is documented in
:mod:`hessian_tools.app.experiments.matrix_sensing`.
"""

import sys

from hessian_tools.app.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """The same as ``hessian-tools matrix-sensing ARGS``."""
    return cli_main(["matrix-sensing", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
