"""Training runs: the run folder, safe checkpoints, seeding, resume, fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import hessian_tools.app.runs as train_mod
from hessian_tools.app.runs import TrainConfig, build_run_model, evaluate, load_run, train
from hessian_tools.app.zoo.models import seeded_build
from hessian_tools.errors import CheckpointError, NonFiniteError

SYN = "builtin:synthetic?n=120&d=6&num_classes=3"


def config(**kw) -> TrainConfig:
    base = dict(
        model="mlp",
        model_kwargs={"hidden": [16]},
        data=SYN,
        method="sgd",
        lr=0.1,
        momentum=0.9,
        epochs=2,
        batch_size=32,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_epoch_run_writes_every_file(tmp_path):
    cfg = config()
    seen = []
    run = train(cfg, tmp_path / "run", progress=seen.append)
    names = sorted(p.name for p in run.iterdir())
    assert names == [
        "epoch_001.pt",
        "epoch_002.pt",
        "final.pt",
        "init.pt",
        "run.json",
        "state_001.pt",
        "state_002.pt",
    ]
    assert [r["epoch"] for r in seen] == [1, 2]

    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished"
    assert TrainConfig.from_dict(meta["config"]) == cfg  # round trip
    assert meta["data"] == SYN and meta["model"] == "mlp" and meta["num_classes"] == 3
    assert set(meta["versions"]) == {"python", "torch", "numpy", "hessian_tools"}
    assert len(meta["epochs"]) == 2
    for rec in meta["epochs"]:
        assert set(rec) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "wall_time_s"}
        assert 0.0 <= rec["train_acc"] <= 1.0 and rec["train_loss"] > 0 and rec["wall_time_s"] > 0

    # every checkpoint is a plain state_dict that loads with weights_only=True into a fresh model
    meta2, ckpts = load_run(run)
    assert meta2 == meta and [p.name for p in ckpts] == ["epoch_001.pt", "epoch_002.pt"]
    for name in ("init.pt", "epoch_001.pt", "epoch_002.pt", "final.pt"):
        sd = weights(run / name)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        model = build_run_model(run, name)
        assert same_weights(model.state_dict(), sd) and not model.training
    assert same_weights(weights(run / "final.pt"), weights(run / "epoch_002.pt"))
    assert not same_weights(weights(run / "init.pt"), weights(run / "final.pt"))
    # the resume states are weights-only loadable too
    state = torch.load(run / "state_002.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"optimizer", "data_generator", "noise_generator"}

    # init.pt is the seeded initialisation; the logged metrics are those of the saved weights
    assert same_weights(build_run_model(meta).state_dict(), weights(run / "init.pt"))
    model = build_run_model(run, run / "final.pt")
    bundle = train_mod.load_data(SYN)
    loss, acc = evaluate(model, *bundle.test)
    assert loss == pytest.approx(meta["epochs"][-1]["test_loss"], rel=1e-6)
    assert acc == meta["epochs"][-1]["test_acc"]


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    torch.manual_seed(0)
    rng_before = torch.random.get_rng_state()
    a = train(config(), tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is never drawn from
    b = train(config(), tmp_path / "b")
    c = train(config(seed=1), tmp_path / "c")
    assert same_weights(weights(a / "final.pt"), weights(b / "final.pt"))
    assert not same_weights(weights(a / "final.pt"), weights(c / "final.pt"))
    assert (
        json.loads((a / "run.json").read_text())["epochs"][1]["test_loss"]
        == json.loads((b / "run.json").read_text())["epochs"][1]["test_loss"]
    )


METHODS = [("sgd", {}), ("nso", {"sigma": 0.05}), ("sam", {"rho": 0.05})]


@pytest.mark.parametrize("method, opts", METHODS)
def test_resume_after_losing_the_last_epoch_is_bit_identical(tmp_path, method, opts):
    cfg = config(
        method=method,
        epochs=3,
        model="cnn",
        model_kwargs={"channels": 4, "batchnorm": True},
        data="builtin:digits-finetune?per_class=12",
        batch_size=16,
        lr=0.05,
        **opts,
    )
    full = train(cfg, tmp_path / "full")

    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("epoch_003.pt", "final.pt"):
        (part / name).unlink()
    meta = json.loads((part / "run.json").read_text())
    meta["status"] = "running"
    (part / "run.json").write_text(json.dumps(meta))

    train(cfg, part, resume=True)
    assert same_weights(weights(part / "final.pt"), weights(full / "final.pt"))
    assert same_weights(weights(part / "epoch_003.pt"), weights(full / "epoch_003.pt"))
    resumed = json.loads((part / "run.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_at"] == [2]
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]
    assert (
        resumed["epochs"][2]["test_loss"]
        == json.loads((full / "run.json").read_text())["epochs"][2]["test_loss"]
    )


def test_interrupted_run_keeps_finished_epochs_and_resumes(tmp_path):
    cfg = config(epochs=3)
    full = train(cfg, tmp_path / "full")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=stop_after_two)
    meta, ckpts = load_run(tmp_path / "cut")
    assert meta["status"] == "running" and len(meta["epochs"]) == 2 and len(ckpts) == 2
    assert not (tmp_path / "cut" / "final.pt").exists()
    train(cfg, tmp_path / "cut", resume=True)
    assert same_weights(weights(tmp_path / "cut" / "final.pt"), weights(full / "final.pt"))

    # a finished run can be extended: 3 epochs, then resume with epochs=4 == a 4-epoch run
    four = train(config(epochs=4), tmp_path / "four")
    train(config(epochs=4), full, resume=True)
    assert same_weights(weights(full / "final.pt"), weights(four / "final.pt"))


def test_resume_and_overwrite_guards(tmp_path):
    run = train(config(epochs=1), tmp_path / "run")
    with pytest.raises(CheckpointError, match="already holds a run; pass resume=True"):
        train(config(epochs=1), run)
    with pytest.raises(CheckpointError, match="config differs in lr"):
        train(config(epochs=2, lr=0.2), run, resume=True)
    # resume=True without a run starts a fresh one
    fresh = train(config(epochs=1), tmp_path / "new", resume=True)
    assert same_weights(weights(fresh / "final.pt"), weights(run / "final.pt"))
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_run(tmp_path / "nowhere")


def test_finetune_from_checkpoint_reinitialises_the_head(tmp_path):
    pre_cfg = config(
        model="cnn", model_kwargs={"channels": 4}, data="builtin:digits-pretrain", epochs=1, batch_size=64
    )
    pre = train(pre_cfg, tmp_path / "pre")
    pre_sd = weights(pre / "final.pt")

    ft_cfg = config(
        model="cnn",
        model_kwargs={"channels": 4},
        data="builtin:digits-finetune?per_class=10",
        epochs=1,
        seed=3,
        init_checkpoint=str(pre / "final.pt"),
    )
    ft = train(ft_cfg, tmp_path / "ft")
    init = weights(ft / "init.pt")
    fresh = seeded_build(3, "cnn", 5, input_shape=(1, 8, 8), channels=4).state_dict()
    for key in init:
        if key.startswith("head."):
            assert torch.equal(init[key], fresh[key]) and not torch.equal(init[key], pre_sd[key])
        else:
            assert torch.equal(init[key], pre_sd[key])
    assert json.loads((ft / "run.json").read_text())["head_reinitialised"] is True

    # reinit_head=False keeps the head when it fits ...
    keep = train(
        config(
            model="cnn",
            model_kwargs={"channels": 4},
            data="builtin:digits-finetune?per_class=10",
            epochs=1,
            init_checkpoint=str(pre / "final.pt"),
            reinit_head=False,
        ),
        tmp_path / "keep",
    )
    assert same_weights(weights(keep / "init.pt"), pre_sd)
    # ... and re-initialises it when the number of classes differs (10 vs 5)
    full10 = train(
        config(
            model="cnn",
            model_kwargs={"channels": 4},
            data="builtin:digits",
            epochs=1,
            init_checkpoint=str(pre / "final.pt"),
            reinit_head=False,
        ),
        tmp_path / "ten",
    )
    meta = json.loads((full10 / "run.json").read_text())
    assert meta["head_reinitialised"] is True and meta["num_classes"] == 10
    assert torch.equal(weights(full10 / "init.pt")["features.0.weight"], pre_sd["features.0.weight"])

    # a checkpoint of another architecture is refused with the key/shape report
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(
            config(
                model="cnn",
                model_kwargs={"channels": 8},
                data="builtin:digits-finetune",
                epochs=1,
                init_checkpoint=str(pre / "final.pt"),
            ),
            tmp_path / "bad",
        )


def test_factory_model_runs_and_rebuilds(tmp_path, monkeypatch):
    (tmp_path / "ht_train_user.py").write_text(
        "import torch\n"
        "def net(num_classes, width=5):\n"
        "    m = torch.nn.Module()\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), "
        "torch.nn.Linear(width, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = train(config(model="ht_train_user:net", model_kwargs={"width": 7}, epochs=1), tmp_path / "run")
    model = build_run_model(run, "final.pt")
    assert model[0].out_features == 7 and model(torch.zeros(2, 6)).shape == (2, 3)


def test_config_validation_and_nonfinite_loss(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        config(method="adam")
    with pytest.raises(ValueError, match="base must be one of"):
        config(base="rmsprop")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        config(epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        config(lr=float("nan"))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        config(model_kwargs={"act": object()})
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"modle": "mlp"})
    with pytest.raises(NonFiniteError, match="training loss became"):
        train(config(lr=1e30, momentum=0.0, epochs=1), tmp_path / "nan")


def test_cosine_schedule_anneals_and_resumes_bit_for_bit(tmp_path):
    from hessian_tools.app.runs import learning_rate

    cfg = config(schedule="cosine", epochs=3)
    assert learning_rate(cfg, 0, 12) == pytest.approx(cfg.lr)
    assert learning_rate(cfg, 6, 12) == pytest.approx(cfg.lr / 2)
    assert learning_rate(cfg, 11, 12) < 0.02 * cfg.lr
    assert learning_rate(config(), 11, 12) == config().lr
    full = train(cfg, tmp_path / "full")
    part = train(dataclasses.replace(cfg, epochs=3), tmp_path / "part")
    (part / "epoch_003.pt").unlink()
    (part / "final.pt").unlink()
    train(cfg, part, resume=True)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(part / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="schedule"):
        config(schedule="step")


def test_resume_accepts_a_run_recorded_before_an_option_existed(tmp_path):
    cfg = config(epochs=1)
    run_dir = train(cfg, tmp_path / "old")
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["config"]["schedule"]  # as written before the option existed
    (run_dir / "run.json").write_text(json.dumps(meta))
    train(dataclasses.replace(cfg, epochs=2), run_dir, resume=True)
    with pytest.raises(CheckpointError, match="schedule"):
        train(dataclasses.replace(cfg, epochs=3, schedule="cosine"), run_dir, resume=True)
