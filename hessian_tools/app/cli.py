"""The ``hessian-tools`` command line: argument parsing and wiring only.

Exit codes: 0 success, 2 bad usage (argparse), 1 a failed analysis — reported as ONE line on
stderr (the traceback only with ``--debug``). Results go to stdout as a table, and with
``--json FILE`` (``-`` = stdout) as JSON, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..estimators.diagonal import METHODS as DIAGONAL_METHODS
from ..estimators.paired import PAIRED_METHODS
from ..optim import BASES, METHODS
from .analyses import ANALYSES, DEFAULT_ANALYSES, POSTERIORS, TRACE_METHODS
from .experiments.matrix_sensing import METHODS as SENSING_METHODS
from .experiments.matrix_sensing import OBJECTIVES as SENSING_OBJECTIVES
from .pipeline import AnalysisSettings
from .runs import SCHEDULES

EPILOG_DEMO = """examples:
  hessian-tools demo                       # the main job on the embedded default (digits, small ResNet)
  hessian-tools demo --quick --out /tmp/d  # a seconds-long smoke run"""
EPILOG_ANALYZE = """examples:
  hessian-tools analyze runs/nso-s0                       # a run folder from `hessian-tools train`
  hessian-tools analyze model.pt --model resnet --data builtin:digits-finetune --what trace,eigs
  hessian-tools analyze model.pt --model mypkg.nets:make_net --data mypkg.data:load --json out.json"""
EPILOG_COMPARE = """examples:
  hessian-tools compare runs/sgd-s0 runs/nso-s0           # paired CI of the trace difference
  hessian-tools compare a.pt b.pt --model cnn --data builtin:digits --max-hvps 400
  hessian-tools compare runs/sgd-s0 runs/nso-s0 --bound --prior-split 0.5   # and each one's bound"""
EPILOG_CURVE = """examples:
  hessian-tools curve runs/sgd-s0 runs/nso-s0 --every 2 --out figures"""
EPILOG_BOUND = """examples:
  hessian-tools bound runs/nso-s0 --prior-split 0.5          # data-dependent prior: the run's recipe on 50%
  hessian-tools bound runs/nso-s0 --delta 0.05               # the pre-trained prior (the run's init.pt)
  hessian-tools bound model.pt --model cnn --data builtin:digits --prior init.pt"""
EPILOG_MATRIX = """examples:
  hessian-tools matrix-sensing --seeds 0 1 2 --out figures     # the paper's setting (d=100, r=5, 5,000 steps)
  hessian-tools matrix-sensing --d 20 --r 2 --steps 500 --out /tmp/ms"""
EPILOG_TRAIN = """examples:
  hessian-tools train --model resnet --data builtin:digits-pretrain --epochs 12 --out runs/pretrain
  hessian-tools train --method nso --sigma 0.01 --init runs/pretrain/final.pt \
--data builtin:digits-finetune --out runs/nso-s0"""


class UsageError(Exception):
    """Bad usage discovered after parsing: exit code 2."""


def _common(
    parser: argparse.ArgumentParser, json_out: bool = True, threads_default: int | None = None
) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to compute (default cpu)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=threads_default,
        help=f"torch intra-op threads (default: {threads_default or 'torch' + chr(39) + 's choice'})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    if json_out:
        parser.add_argument("--json", metavar="FILE", help="also write the result as JSON ('-' = stdout)")


def _distributed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: shard the data over the ranks (gloo on CPU, nccl on CUDA); rank 0 writes",
    )


def _model_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="mlp | cnn | resnet | MODULE:FACTORY (needed for a checkpoint file)")
    parser.add_argument(
        "--data",
        help="builtin:digits | builtin:digits-finetune | builtin:digits-pretrain | "
        "builtin:synthetic | MODULE:FUNCTION (needed for a checkpoint file). "
        "FUNCTION() returns a dict {train, test, num_classes}, a (train, test) pair "
        "or the training data alone; a split is (X, y) tensors, a Dataset, a "
        "DataLoader or a list of batches; a batch is (inputs, targets) or a dict "
        "with 'labels'; inputs a tensor, a tuple (positional) or a dict (keyword "
        "arguments, e.g. input_ids/attention_mask). Not a generator: it is "
        "passed over many times",
    )
    parser.add_argument(
        "--checkpoint-key",
        metavar="NAME",
        help="which state_dict inside the checkpoint, e.g. ema or state_dict.model_ema "
        "(default: the model's own weights; a note on stderr says what was used)",
    )
    parser.add_argument("--params", metavar="REGEX", help="analyse only parameters whose names match")
    parser.add_argument(
        "--batch-size", type=int, default=512, help="batch size of the data passes (default 512)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="computation precision"
    )
    _loss(parser)
    _memory(parser)


def _memory_budget(text: str):
    """``--memory-budget``: ``auto``, ``none`` or a size such as 4GB, 512MB, 2.5GiB."""
    from ..operators.memory import MemoryBudgetError, parse_size

    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        parse_size(text, "--memory-budget")
    except MemoryBudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget",
        type=_memory_budget,
        default="auto",
        metavar="SIZE",
        help="memory one Hessian-vector product may take beyond the model and data, e.g. 4GB, 512MB, "
        "2.5GiB: the operator measures what a probe column costs and chunks the probes (and, if need "
        "be, the batches) to fit; auto (default): a quarter of the available memory; none: no bound",
    )


def _loss(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loss",
        default="cross_entropy",
        metavar="LOSS",
        help="cross_entropy | mse | MODULE:FACTORY, FACTORY() returning loss(outputs, targets) -> "
        "the batch-mean scalar (default cross_entropy); the PAC-Bayes bound needs class labels",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-tools", description="Curvature of trained networks, with error bars."
    )
    parser.add_argument("--version", action="version", version=f"hessian-tools {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (
        _add_demo,
        _add_analyze,
        _add_compare,
        _add_curve,
        _add_bound,
        _add_train,
        _add_matrix_sensing,
    ):
        add_command(sub)
    return parser


def _command(sub, name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_demo(sub) -> None:
    p = _command(sub, "demo", "pre-train, fine-tune with SGD/SAM/NSO, analyse, report", EPILOG_DEMO)
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument(
        "--no-resume", action="store_true", help="recompute finished pieces instead of reusing them"
    )
    # One thread: the demo's models are tiny, and two threads on a 2-core machine where anything else
    # runs stalled every parallel region (measured: 0.1 s → 5–15 s per epoch).
    _common(p, json_out=False, threads_default=1)
    p.set_defaults(func=cmd_demo)


def _add_analyze(sub) -> None:
    p = _command(
        sub, "analyze", "trace, eigenvalues, density, stability and bounds of one checkpoint", EPILOG_ANALYZE
    )
    p.add_argument("checkpoint", help="a state_dict file or a run folder")
    _model_data(p)
    p.add_argument(
        "--what",
        default=",".join(DEFAULT_ANALYSES),
        help=f"comma-separated subset of {','.join(ANALYSES)} (default %(default)s)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=0.02,
        help="trace: stop at 95%% half-width ≤ rtol·|trace| (default 0.02)",
    )
    _hvp_budget(p, 600, "HVP budget per estimator")
    p.add_argument(
        "--trace-method",
        choices=TRACE_METHODS,
        default="auto",
        help="trace estimator (default auto: adaptive XTrace with a jackknife error bar where its sketch "
        "fits the memory budget, else Hutch++, which streams its probes)",
    )
    p.add_argument(
        "--diag-method",
        choices=DIAGONAL_METHODS,
        default="xdiag",
        help="diag: the Hessian-diagonal estimator (default xdiag; budget --max-hvps)",
    )
    _certificate_options(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from FILE.partial, the state that --json FILE keeps while it "
        "runs (finished analyses and the HVPs spent); the numbers equal an uninterrupted run's",
    )
    _common(p)
    _distributed(p)
    p.set_defaults(func=cmd_analyze)


def _add_compare(sub) -> None:
    p = _command(
        sub, "compare", "paired trace comparison of checkpoints with common random probes", EPILOG_COMPARE
    )
    p.add_argument(
        "checkpoints", nargs="+", help="state_dict files or run folders (the first is the baseline)"
    )
    _model_data(p)
    _hvp_budget(p, 300, "HVPs per checkpoint (fixed, the same for all)")
    p.add_argument("--trace-method", choices=PAIRED_METHODS, default="hutchpp")
    p.add_argument(
        "--bound", action="store_true", help="also certify each checkpoint (PAC-Bayes bound columns)"
    )
    _certificate_options(p)
    _common(p)
    _distributed(p)
    p.set_defaults(func=cmd_compare)


def _add_curve(sub) -> None:
    p = _command(sub, "curve", "trace and λmax of every epoch's checkpoint of run folders", EPILOG_CURVE)
    p.add_argument("runs", nargs="+", help="run folders written by `hessian-tools train`")
    p.add_argument("--every", type=int, default=1, help="analyse every n-th epoch (default 1)")
    p.add_argument("--rtol", type=float, default=0.05, help="trace tolerance per point (default 0.05)")
    _hvp_budget(p, 600, "HVP budget per estimator and point")
    p.add_argument(
        "--out", help="folder for the sharpness-curve figure and per-run results (enables --resume)"
    )
    p.add_argument("--resume", action="store_true", help="skip runs whose curve is already saved in --out")
    p.add_argument("--batch-size", type=int, default=512)
    _loss(p)
    _memory(p)
    _common(p)
    _distributed(p)
    p.set_defaults(func=cmd_curve)


def _add_bound(sub) -> None:
    p = _command(sub, "bound", "PAC-Bayes certificate and Hessian measures of a checkpoint", EPILOG_BOUND)
    p.add_argument("checkpoint", help="a state_dict file or a run folder")
    _model_data(p)
    _certificate_options(p)
    _common(p)
    p.set_defaults(func=cmd_bound)


def _certificate_options(p: argparse.ArgumentParser) -> None:
    defaults = AnalysisSettings()
    p.add_argument("--prior", help="prior/initial weights (a run folder's init.pt by default)")
    p.add_argument(
        "--posterior",
        choices=POSTERIORS,
        default="optimised",
        help="optimised: a diagonal Gaussian fitted to the bound (default); isotropic: "
        "N(W, σ²I) on the --sigmas grid (vacuous on fine-tuned networks)",
    )
    p.add_argument(
        "--prior-split",
        type=float,
        metavar="FRACTION",
        help="data-dependent prior: train it with the run's own recipe on this fraction of "
        "the training set (from the run's init weights) and bound on the rest; needs a "
        "run folder",
    )
    p.add_argument(
        "--prior-epochs",
        type=int,
        default=defaults.prior_epochs,
        help="epochs of the prior's training (default %(default)s)",
    )
    p.add_argument(
        "--delta", type=float, default=defaults.delta, help="the bound holds with probability ≥ 1 − delta"
    )
    p.add_argument(
        "--samples", type=int, help="Monte-Carlo weight draws (default 1000 optimised, 20 isotropic)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=defaults.certificate_steps,
        help="optimisation steps of the optimised posterior (default %(default)s)",
    )
    p.add_argument(
        "--sigmas",
        default=",".join(map(str, defaults.certificate_sigmas)),
        help="isotropic posterior: the σ grid, paid for by a union bound (default %(default)s)",
    )


def _add_train(sub) -> None:
    p = _command(sub, "train", "train with sgd/nso/wp/sam/asam and write a run folder", EPILOG_TRAIN)
    p.add_argument("--method", default="sgd", choices=METHODS)
    p.add_argument("--model", default="resnet", help="mlp | cnn | resnet | MODULE:FACTORY")
    p.add_argument("--data", default="builtin:digits", help="data spec (see `analyze --help`)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base", default="sgd", choices=BASES)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--sigma", type=float, help="NSO/WP noise scale σ")
    p.add_argument("--k", type=int, help="NSO/WP number of draws per step")
    p.add_argument("--lam", type=float, help="NSO weight on the unperturbed gradient")
    p.add_argument("--rho", type=float, help="SAM/ASAM radius")
    p.add_argument("--init", help="initial checkpoint (fine-tuning); its head is re-initialised")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out after its last finished epoch"
    )
    _common(p, json_out=False)
    p.set_defaults(func=cmd_train)


def _add_matrix_sensing(sub) -> None:
    p = _command(
        sub, "matrix-sensing", "the NSO paper's matrix-sensing experiment (GD vs WP-GD vs NSO)", EPILOG_MATRIX
    )
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds, space- or comma-separated (default 0)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument(
        "--out", default="figures", help="folder for matrix_sensing.json, .png and .pdf (default figures)"
    )
    p.add_argument("--methods", nargs="+", default=list(SENSING_METHODS), choices=SENSING_METHODS)
    p.add_argument("--d", type=int, default=100, help="matrix side d (default 100, as in the paper)")
    p.add_argument("--r", type=int, default=5, help="true rank r (default 5)")
    p.add_argument("--m", type=int, help="measurements per split (default 5·d·r)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=0.08, help="WP/NSO noise scale (default 0.08)")
    p.add_argument("--init-scale", type=float, default=1.0)
    p.add_argument("--objective", default="half_mse", choices=SENSING_OBJECTIVES)
    p.add_argument("--log-every", type=int, default=50)
    _common(p, json_out=False, threads_default=1)
    p.set_defaults(func=cmd_matrix_sensing)


def _hvp_budget(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    parser.add_argument("--max-hvps", type=int, default=default, help=f"{what} (default {default})")


# --------------------------------------------------------------------------- helpers
class Progress:
    """Status lines on stderr (a tqdm bar when stderr is a terminal); silent with --quiet."""

    def __init__(self, quiet: bool, total: int | None = None, desc: str = ""):
        self.enabled = not quiet
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.update(1)
        else:
            print(f"… {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _emit_json(target: str | None, obj) -> None:
    if not target:
        return
    from ..results import _to_jsonable
    from .io import atomic_write_json

    if target == "-":
        print(json.dumps(_to_jsonable(obj), indent=2))
    else:
        atomic_write_json(target, obj)
        print(f"wrote {target}", file=sys.stderr)


def _settings(args, what):
    from .pipeline import AnalysisSettings

    certificate = {}
    if hasattr(args, "posterior"):
        _check_certificate_options(args)
        certificate = {
            "posterior": args.posterior,
            "prior_split": args.prior_split,
            "prior_epochs": args.prior_epochs,
            "delta": args.delta,
            "certificate_samples": args.samples,
            "certificate_steps": args.steps,
            "certificate_sigmas": _floats(args.sigmas, "--sigmas"),
        }
    max_hvps = getattr(args, "max_hvps", 600)
    return AnalysisSettings(
        what=tuple(what),
        params=args.params,
        batch_size=args.batch_size,
        seed=args.seed,
        trace_method=getattr(args, "trace_method", "auto"),
        trace_rtol=getattr(args, "rtol", 0.02),
        trace_max_hvps=max_hvps,
        eig_max_hvps=max_hvps,
        diag_max_hvps=max_hvps,
        diag_method=getattr(args, "diag_method", "xdiag"),
        dtype=args.dtype,
        device=args.device,
        distributed=getattr(args, "distributed", False),
        loss=getattr(args, "loss", "cross_entropy"),
        memory_budget=getattr(args, "memory_budget", "auto"),
        **certificate,
    )


def _check_certificate_options(args) -> None:
    if args.prior_split is not None and not 0 < args.prior_split < 1:
        raise UsageError(
            f"--prior-split must be a fraction strictly between 0 and 1, got {args.prior_split:g}"
        )
    if args.prior_split is not None and args.posterior != "optimised":
        raise UsageError("--prior-split needs --posterior optimised")
    if not 0 < args.delta < 1:
        raise UsageError(f"--delta must be strictly between 0 and 1, got {args.delta:g}")
    counts = (("--samples", args.samples), ("--steps", args.steps), ("--prior-epochs", args.prior_epochs))
    for option, value in counts:
        if value is not None and value < 1:
            raise UsageError(f"{option} must be ≥ 1, got {value}")


def _prior_trainer(args, target: str):
    """The data-dependent prior's trainer: the run folder's own recipe (None without --prior-split)."""
    if getattr(args, "prior_split", None) is None:
        return None
    if not Path(target).is_dir():
        raise UsageError(
            f"--prior-split trains the prior with the checkpoint's own training recipe, "
            f"which the file {target} lacks: point the command at a run folder from "
            "`hessian-tools train`"
        )
    from .runs import recipe_trainer

    return recipe_trainer(target, args.prior_epochs)


def _resolve(args, target: str, prior: str | None = None):
    """Load a checkpoint or run folder; a note on stderr says what was taken from the file (an entry,
    a stripped prefix), so the user sees which weights are analysed.
    """
    from .checkpoints import resolve

    loaded = resolve(target, args.model, args.data, prior, checkpoint_key=args.checkpoint_key)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    return loaded


def _parse_what(text: str) -> list[str]:
    what = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in what if w not in ANALYSES]
    if unknown or not what:
        raise UsageError(
            f"unknown --what {', '.join(map(repr, unknown)) or '(empty)'}; choose from {','.join(ANALYSES)}"
        )
    return what


def _integers(values, option: str) -> list[int]:
    """Integers given space- and/or comma-separated (``--seeds 0 1 2`` or ``--seeds 0,1,2``)."""
    items = [item for value in values for item in str(value).split(",") if item.strip()]
    try:
        numbers = [int(item) for item in items]
    except ValueError:
        raise UsageError(f"{option} must be integers, got {' '.join(map(str, values))!r}") from None
    if not numbers:
        raise UsageError(f"{option} is empty")
    return numbers


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo, write_demo_report

    config = DemoConfig(analysis=DemoConfig().analysis)
    if args.quick:
        config = config.quick()
    config = dataclasses.replace(
        config, analysis=dataclasses.replace(config.analysis, seed=args.seed, device=args.device)
    )
    with Progress(args.quiet) as progress:
        results = run_demo(args.out, config, resume=not args.no_resume, progress=progress)
        report = write_demo_report(results, args.out)
    print(Path(report).read_text().split("## Per run")[0].rstrip())
    print(f"\nreport: {report}")
    return 0


def cmd_analyze(args) -> int:
    what = _parse_what(args.what)
    settings = _settings(args, what)
    trainer = _prior_trainer(args, args.checkpoint) if "bound" in what else None
    loaded = _resolve(args, args.checkpoint, args.prior)
    if "bound" in what and loaded.prior is None:
        print("note: no prior weights (--prior), so no PAC-Bayes bound", file=sys.stderr)
    return _analyze_and_print(args, loaded, settings, trainer)


def _analyze_and_print(args, loaded, settings, prior_trainer=None) -> int:
    from .pipeline import analyze_model
    from .report import analysis_text

    state_file = _state_file(args)
    try:
        with Progress(args.quiet) as progress:
            result = analyze_model(
                loaded.model,
                loaded.data,
                settings,
                prior_state=loaded.prior,
                name=loaded.name,
                prior_trainer=prior_trainer,
                progress=None if args.quiet else progress,
                state_file=state_file,
                resume=getattr(args, "resume", False),
            )
    except KeyboardInterrupt:
        if state_file is not None and state_file.is_file():
            print(
                f"note: the work done so far is in {state_file}; "
                "run the same command with --resume to continue",
                file=sys.stderr,
            )
        raise
    print(analysis_text(result))
    _emit_json(args.json, result)
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    return 0


def _state_file(args) -> Path | None:
    """``--json FILE``'s state file (``FILE.partial``) for ``analyze``; None without a JSON file."""
    from .resume import state_path

    if getattr(args, "resume", False) and (not args.json or args.json == "-"):
        raise UsageError(
            "--resume needs --json FILE: the state of an interrupted run is kept in FILE.partial"
        )
    if args.command != "analyze" or not args.json or args.json == "-" or getattr(args, "distributed", False):
        return None
    return state_path(args.json)


def cmd_compare(args) -> int:
    from ..estimators.paired import paired_traces
    from .pipeline import make_operator
    from .report import bound_note, comparison_header, comparison_rows, text_table

    if len(args.checkpoints) < 2:
        raise UsageError("compare needs at least two checkpoints")
    settings = _settings(args, ["trace"])
    operators, loaded_by_name = {}, {}
    for target in args.checkpoints:
        trainer = _prior_trainer(args, target) if args.bound else None
        loaded = _resolve(args, target, args.prior)
        if args.bound:
            _require_prior(loaded)
        name = loaded.name if loaded.name not in operators else f"{loaded.name}#{len(operators)}"
        operators[name] = make_operator(loaded.model, loaded.data, settings)
        loaded_by_name[name] = (loaded, trainer)
    with Progress(args.quiet) as progress:
        result = paired_traces(
            operators, method=args.trace_method, max_hvps=args.max_hvps, seed=args.seed, progress=progress
        )
        bounds = _certify_all(loaded_by_name, settings, progress) if args.bound else None
    print(text_table(comparison_header(bounds is not None), comparison_rows(result, bounds)))
    print(
        f"\nsame probes for every checkpoint (seed {args.seed}, {args.max_hvps} HVPs each, "
        f"{args.trace_method})"
    )
    if bounds:
        print(f"bounds: {bound_note(bounds, settings)}")
    _emit_json(args.json, {"comparison": result, "certificates": bounds} if bounds is not None else result)
    return 0


def _certify_all(loaded_by_name: dict, settings, progress) -> dict:
    from .pipeline import certify

    out = {}
    for name, (loaded, trainer) in loaded_by_name.items():
        progress(f"certifying {name}")
        out[name] = certify(loaded.model, loaded.data, settings, loaded.prior, trainer)
    return out


def cmd_curve(args) -> int:
    from .curves import run_curve
    from .report import CURVE_HEADER, curve_rows, text_table

    if args.every < 1:
        raise UsageError("--every must be ≥ 1")
    with Progress(args.quiet) as progress:
        curves, figures = run_curve(
            args.runs,
            every=args.every,
            rtol=args.rtol,
            seed=args.seed,
            batch_size=args.batch_size,
            out=args.out,
            resume=args.resume,
            progress=progress,
            distributed=args.distributed,
            device=args.device,
            loss=args.loss,
            memory_budget=args.memory_budget,
        )
    rows = [row for name, points in curves.items() for row in curve_rows(name, points)]
    print(text_table(CURVE_HEADER, rows))
    for figure in figures:
        print(f"figure: {figure}", file=sys.stderr)
    _emit_json(args.json, curves)
    return 0


def cmd_bound(args) -> int:
    settings = _settings(args, ["bound"])
    trainer = _prior_trainer(args, args.checkpoint)
    loaded = _resolve(args, args.checkpoint, args.prior)
    _require_prior(loaded)
    return _analyze_and_print(args, loaded, settings, trainer)


def _require_prior(loaded) -> None:
    if loaded.prior is None:
        raise UsageError(
            "a bound needs the prior (initial) weights: pass --prior FILE (run folders use their init.pt)"
        )


def cmd_train(args) -> int:
    from .runs import TrainConfig, train

    options = {k: getattr(args, k) for k in ("sigma", "k", "lam", "rho") if getattr(args, k) is not None}
    config = TrainConfig(
        model=args.model,
        data=args.data,
        method=args.method,
        base=args.base,
        lr=args.lr,
        schedule=args.schedule,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        init_checkpoint=args.init,
        **options,
    )
    quiet = args.quiet

    def report(record):
        if not quiet:
            print(
                f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.3f} | test loss {record['test_loss']:.4f} "
                f"acc {record['test_acc']:.3f} ({record['wall_time_s']:.1f} s)",
                file=sys.stderr,
            )

    run_dir = train(config, args.out, resume=args.resume, progress=report)
    print(f"run folder: {run_dir}")
    return 0


def cmd_matrix_sensing(args) -> int:
    from .experiments.matrix_sensing import run_experiment, write_results

    seeds = _integers(args.seeds, "--seeds")
    say = (lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = run_experiment(
        seeds,
        args.steps,
        args.methods,
        d=args.d,
        r=args.r,
        m=args.m,
        lr=args.lr,
        sigma=args.sigma,
        init_scale=args.init_scale,
        objective=args.objective,
        log_every=args.log_every,
        num_threads=args.threads,
        say=say,
    )
    written = write_results(results, args.out)
    print(f"wrote {', '.join(map(str, written))} ({results['total_wall_time_s']:.0f}s in all)")
    return 0


def _start_distributed(args) -> None:
    """Join the torchrun process group; ranks other than 0 print and write nothing."""
    from ..operators.distributed import init_from_env, is_main_process

    _, _, device = init_from_env(args.device)
    args.device = str(device)
    if not is_main_process():
        args.quiet, args.json = True, None
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed at exit


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    distributed = getattr(args, "distributed", False)
    import torch

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(max(1, args.threads))
    try:
        if distributed:
            _start_distributed(args)
        return args.func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"hessian-tools {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "hessian-tools: interrupted (finished results are saved; re-run with --resume where offered)",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, never a traceback dump
        if getattr(args, "debug", False):
            raise
        from .checkpoint_formats import plain_line

        message = plain_line(exc, limit=None) or type(exc).__name__
        print(f"hessian-tools {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
