"""The main job on the embedded default: does NSO flatten a fine-tuned ResNet, and what does it buy?

1. Pre-train a small ResNet (BatchNorm, skip connections) on digits 0–4.
2. Fine-tune it on the low-sample split of digits 5–9 (50 images per class) with SGD, SAM and
   NSO, several seeds each, from the same pre-trained weights (a freshly initialised head).
3. Analyse every final checkpoint (trace with CI, top-5 and smallest eigenvalues, SLQ density,
   noise stability vs σ, PAC-Bayes certificate with a data-dependent prior, and Hessian measures) and
   every epoch's checkpoint more cheaply (trace and λmax: the sharpness curve).
4. Write ``results.json`` (every result, with its error bars, seeds and HVP counts), ``report.md``
   and the figures. Finished pieces are saved as they complete; ``resume=True`` skips them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

from ..results import result_from_dict
from .checkpoints import load_state_dict
from .curves import sharpness_curve
from .io import atomic_write_json, atomic_write_text, read_json
from .pipeline import AnalysisSettings, CheckpointAnalysis, analyze_model
from .report import violated_certificates
from .runs import TrainConfig, build_run_model, recipe_trainer, train
from .zoo.data import load_data


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults finish in a few minutes on 2 CPU cores."""

    model: str = "resnet"
    methods: tuple = ("sgd", "sam", "nso")
    seeds: tuple = (0, 1, 2)
    pretrain_epochs: int = 12
    pretrain_lr: float = 0.05
    pretrain_schedule: str = "cosine"
    pretrain_batch_size: int = 32
    # Fine-tuning: 100 images per class, 40 epochs at a constant lr 0.01 in batches of 16. Measured with
    # the CLI (3 seeds): NSO's trace 53–69% and λmax 44–77% below SGD's; 50 per class with 10 cosine
    # epochs at lr 0.02 (the earlier demo) gave −10% ± 8% and no resolvable λmax change. A constant lr
    # leaves the run at the end of its trajectory, not annealed into whatever basin it last crossed.
    finetune_epochs: int = 40
    lr: float = 0.01
    schedule: str = "constant"
    batch_size: int = 16
    # NSO noise scale (absolute, one value for all tensors, as in the paper). At 0.01 the penalty
    # σ²/2·Tr(H) ≈ 0.01 is too small to change this network (measured: −1% trace); 0.03 (≈ 0.13) is
    # where the noise-stability curve starts to leave its Taylor approximation.
    sigma: float = 0.03
    k: int = 1
    rho: float = 0.05  # SAM radius
    per_class: int = 100
    curve_every: int = 10  # analyse every n-th epoch for the sharpness curve
    analysis: AnalysisSettings = AnalysisSettings()
    curve_rtol: float = 0.05
    curve_eig_tol: float = 1e-3
    # The PAC-Bayes certificate of every final checkpoint (these override ``analysis``): the optimised
    # posterior with a data-dependent prior, trained with the run's own recipe on ``prior_split`` of the
    # fine-tuning set for ``prior_epochs`` epochs from the run's start; the bound is on the rest.
    # Measured (analysis/bench_bound.py): 100 per class, 0.5, 20 epochs → bounds 0.10–0.13.
    prior_split: float = 0.5
    prior_epochs: int = 20
    certificate_steps: int = 600
    certificate_samples: int = 1000  # Monte-Carlo weight draws on the bound set (their error is in the bound)
    certificate_test_samples: int = 200  # draws for the posterior's measured test error

    def quick(self) -> DemoConfig:
        """Tiny settings for smoke tests (seconds, not minutes)."""
        return dataclasses.replace(
            self,
            seeds=(0,),
            pretrain_epochs=2,
            finetune_epochs=2,
            curve_every=1,
            per_class=10,
            prior_epochs=1,
            certificate_steps=20,
            certificate_samples=50,
            certificate_test_samples=10,
            analysis=dataclasses.replace(
                self.analysis,
                trace_max_hvps=60,
                trace_rtol=0.2,
                eig_k=2,
                eig_max_hvps=60,
                density_probes=2,
                density_steps=10,
                sigmas=(1e-2,),
                stability_samples=8,
            ),
        )

    def analysis_settings(self) -> AnalysisSettings:
        """``analysis`` with the demo's certificate settings."""
        return dataclasses.replace(
            self.analysis,
            posterior="optimised",
            prior_split=self.prior_split,
            prior_epochs=self.prior_epochs,
            certificate_steps=self.certificate_steps,
            certificate_samples=self.certificate_samples,
            certificate_test_samples=self.certificate_test_samples,
        )


def run_demo(
    out_dir: str | Path,
    config: DemoConfig = DemoConfig(),
    *,
    resume: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the whole demo into ``out_dir``; returns the results dict also written to results.json."""
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    runs_dir, results_dir = out / "runs", out / "results"
    start = time.perf_counter()

    say("pre-training on digits 0–4")
    pretrain = train(
        TrainConfig(
            model=config.model,
            data="builtin:digits-pretrain",
            lr=config.pretrain_lr,
            schedule=config.pretrain_schedule,
            epochs=config.pretrain_epochs,
            batch_size=config.pretrain_batch_size,
            seed=0,
        ),
        runs_dir / "pretrain",
        resume=resume,
    )
    finetune_data = f"builtin:digits-finetune?per_class={config.per_class}"
    bundle = load_data(finetune_data)

    runs = []
    for method in config.methods:
        for seed in config.seeds:
            name = f"{method}-s{seed}"
            say(f"fine-tuning {name}")
            run_dir = train(
                TrainConfig(
                    model=config.model,
                    data=finetune_data,
                    method=method,
                    lr=config.lr,
                    schedule=config.schedule,
                    epochs=config.finetune_epochs,
                    batch_size=config.batch_size,
                    seed=seed,
                    init_checkpoint=str(pretrain / "final.pt"),
                    **_method_options(config, method),
                ),
                runs_dir / name,
                resume=resume,
            )
            analysis = _cached(
                results_dir / f"{name}.json",
                resume,
                functools.partial(_analyse_final, run_dir, bundle, config, name, say),
            )
            curve = _cached(
                results_dir / f"{name}-curve.json",
                resume,
                functools.partial(
                    sharpness_curve,
                    run_dir,
                    bundle,
                    config.analysis,
                    every=config.curve_every,
                    rtol=config.curve_rtol,
                    eig_tol=config.curve_eig_tol,
                    progress=say,
                ),
            )
            runs.append(
                {
                    "name": name,
                    "method": method,
                    "seed": seed,
                    "run_dir": str(run_dir.relative_to(out)),
                    "analysis": analysis,
                    "curve": curve,
                }
            )
    results = {
        "kind": "demo",
        "config": dataclasses.asdict(config),
        "pretrain": read_json(pretrain / "run.json")["epochs"][-1],
        "data": {
            "name": bundle.name,
            "n_train": int(bundle.train[1].numel()),
            "n_test": int(bundle.test[1].numel()),
        },
        "runs": runs,
        "wall_time_s": time.perf_counter() - start,
    }
    violated = violated_certificates(runs)
    if violated:
        say(f"WARNING: CERTIFICATE VIOLATED on {', '.join(violated)} (posterior test error above its bound)")
    results["violated_certificates"] = violated
    atomic_write_json(out / "results.json", results)
    return results


def _method_options(config: DemoConfig, method: str) -> dict:
    if method in ("nso", "wp"):
        return {"sigma": config.sigma, "k": config.k}
    if method in ("sam", "asam"):
        return {"rho": config.rho}
    return {}


def _cached(path: Path, resume: bool, compute: Callable[[], object]):
    """Load a finished result from ``path`` when resuming; otherwise compute it and save it atomically."""
    if resume and path.is_file():
        data = read_json(path)
        return result_from_dict(data) if isinstance(data, dict) and "kind" in data else data
    value = compute()
    atomic_write_json(path, value)
    return value


def _analyse_final(run_dir: Path, bundle, config: DemoConfig, name: str, say) -> CheckpointAnalysis:
    say(f"analysing {name}")
    model = build_run_model(run_dir, "final.pt")
    prior = load_state_dict(run_dir / "init.pt")
    settings = config.analysis_settings()
    trainer = recipe_trainer(run_dir, settings.prior_epochs) if settings.prior_split is not None else None
    return analyze_model(model, bundle, settings, prior_state=prior, prior_trainer=trainer, name=name)


def write_demo_report(results: dict, out_dir: str | Path) -> Path:
    """Draw the figures and write report.md next to results.json; returns the report's path."""
    from .plots import plot_demo
    from .report import demo_markdown

    out = Path(out_dir)
    figures = plot_demo(results, out / "figures")
    pngs = [str(Path(f).relative_to(out)) for f in figures if str(f).endswith(".png")]
    return atomic_write_text(out / "report.md", demo_markdown(results, pngs))
