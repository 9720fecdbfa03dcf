"""The CLI on the inputs and losses of real models (dict/tuple inputs, Datasets, DataLoaders,
custom losses) and an interrupted ``analyze`` resumed with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from hessian_tools.app.cli import main
from hessian_tools.operators import HessianOperator
from hessian_tools.operators.adapters import DenseOperator
from hessian_tools.operators.recording import RecordingOperator, ReplayMismatchError

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 3)
            self.head = nn.Linear(3, 3)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).float()
            return {"logits": self.head((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1))}

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    def make_bag():
        torch.manual_seed(0)
        return Bag()

    def make_pair():
        torch.manual_seed(0)
        return Pair()

    def _text(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 30, (n, 6), generator=g)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[:, 4:] = torch.randint(0, 2, (n, 2), generator=g)
        return ids, mask, ids[:, 0] % 3

    class TextSet(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            self.ids, self.mask, self.y = _text(n, seed)
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}

    def dataset():
        return {"train": TextSet(24, 0), "test": TextSet(10, 1), "num_classes": 3}

    def loader():
        return torch.utils.data.DataLoader(TextSet(24, 0), batch_size=7)

    def batch_list():
        ids, mask, y = _text(24, 0)
        return [({"input_ids": ids[i:i + 10], "attention_mask": mask[i:i + 10]}, y[i:i + 10])
                for i in (0, 10, 20)]

    def one_shot():
        return (batch for batch in batch_list())

    def pairs():
        g = torch.Generator().manual_seed(2)
        x1, x2 = torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g)
        return {"train": ((x1, x2), torch.randn(20, 3, generator=g)), "test": None, "num_classes": None}

    def half_mse():
        return lambda outputs, targets: 0.5 * ((outputs - targets) ** 2).sum(1).mean()
""")


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user module importable as ``ri_user``, and checkpoints of its two models."""
    (tmp_path / "ri_user.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("ri_user")
    importlib.reload(module)
    torch.save(module.make_bag().state_dict(), tmp_path / "bag.pt")
    torch.save(module.make_pair().state_dict(), tmp_path / "pair.pt")
    return tmp_path


def analyze(user, capsys, *extra, model="bag", data="dataset", what="trace,eigs"):
    code = main(
        [
            "analyze",
            str(user / f"{model}.pt"),
            "--model",
            f"ri_user:make_{model}",
            "--data",
            f"ri_user:{data}",
            "--what",
            what,
            "--max-hvps",
            "30",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def numbers(path) -> dict:
    """The JSON result without its wall-clock fields (everything else must agree bit for bit)."""
    result = json.loads(path.read_text())
    for key in ("wall_time_s", "timings"):
        result.pop(key)
    return result


@pytest.mark.parametrize("data", ["dataset", "loader", "batch_list"])
def test_dict_inputs_give_the_same_hessian_from_every_data_form(user, capsys, data):
    code, out, _ = analyze(user, capsys, "--json", str(user / f"{data}.json"), "--quiet", data=data)
    assert code == 0 and "Hessian trace" in out
    reference = HessianOperator(
        __import__("ri_user").make_bag(),
        torch.nn.functional.cross_entropy,
        __import__("ri_user").batch_list(),
    )
    result = json.loads((user / f"{data}.json").read_text())
    exact = torch.diagonal(reference.dense()).sum().item()
    assert result["n_train"] == 24
    # hutch++ with 30 HVPs on a 102-parameter Hessian: within 5 standard errors of the exact trace
    assert abs(result["trace"]["estimate"] - exact) <= 5 * result["trace"]["stderr"] + 1e-5 * abs(exact)
    assert (result["n_test"] == 10) == (data == "dataset")


def test_tuple_inputs_with_a_custom_loss_and_mse(user, capsys):
    code, out, _ = analyze(
        user,
        capsys,
        "--loss",
        "ri_user:half_mse",
        "--quiet",
        "--json",
        str(user / "h.json"),
        model="pair",
        data="pairs",
        what="trace",
    )
    assert code == 0 and "loss ri_user:half_mse" in out
    code, _, _ = analyze(
        user,
        capsys,
        "--loss",
        "mse",
        "--quiet",
        "--json",
        str(user / "m.json"),
        model="pair",
        data="pairs",
        what="trace",
    )
    assert code == 0
    half, mse = (json.loads((user / f"{n}.json").read_text()) for n in "hm")
    # ½·Σ_j over 3 outputs = 1.5 × mean over entries: the losses and the Hessians scale by 1.5
    assert half["train_loss"] == pytest.approx(1.5 * mse["train_loss"], rel=1e-6)
    # the model is linear in its weights: the Hessian is constant, and exact for Hutch++ after dim probes
    assert half["trace"]["estimate"] == pytest.approx(1.5 * mse["trace"]["estimate"], rel=0.2)


def test_bound_refuses_targets_that_are_not_class_labels(user, capsys, tmp_path):
    code, _, err = analyze(
        user,
        capsys,
        "--loss",
        "mse",
        "--prior",
        str(user / "pair.pt"),
        "--quiet",
        model="pair",
        data="pairs",
        what="bound",
    )
    assert code == 1 and "needs integer class labels" in err and len(err.strip().splitlines()) == 1


def test_one_shot_generator_is_refused_in_one_line(user, capsys):
    code, _, err = analyze(user, capsys, data="one_shot")
    assert code == 1 and "one-shot iterator" in err and "Traceback" not in err


def test_progress_reports_rate_and_time_left(user, capsys):
    code, _, err = analyze(user, capsys)
    assert code == 0 and "trace: " in err and "/30 HVPs" in err and "HVPs/s" in err and "left" in err
    _, _, quiet = analyze(user, capsys, "--quiet")
    assert "HVPs/s" not in quiet


class Counter:
    """Counts the products HessianOperator computes; raises KeyboardInterrupt at call ``stop``."""

    def __init__(self, monkeypatch, stop=None):
        self.calls, self.stop = 0, stop
        original = HessianOperator._matmat

        def counted(op, V):
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
            return original(op, V)

        monkeypatch.setattr(HessianOperator, "_matmat", counted)


@pytest.mark.parametrize("stop_in", ["eigs", "density"])
def test_resume_gives_exactly_the_uninterrupted_numbers_without_recomputing(
    user, capsys, monkeypatch, stop_in
):
    what = "trace,eigs,density"
    full = Counter(monkeypatch)
    assert analyze(user, capsys, "--json", str(user / "full.json"), "--quiet", what=what)[0] == 0
    full_calls = full.calls  # the counters stack: read this one before the next patch
    assert not (user / "full.json.partial").exists()
    stop = 8 if stop_in == "eigs" else full_calls - 2  # trace takes a few block products, then eigs
    Counter(monkeypatch, stop=stop)
    code, _, err = analyze(user, capsys, "--json", str(user / "cut.json"), "--quiet", what=what)
    assert code == 130 and (user / "cut.json.partial").is_file() and not (user / "cut.json").exists()
    assert "--resume" in err
    state = torch.load(user / "cut.json.partial", weights_only=True)
    assert state["current"][0] == stop_in and state["current"][1] and "trace" in state["finished"]
    resumed = Counter(monkeypatch)
    assert analyze(user, capsys, "--json", str(user / "cut.json"), "--quiet", "--resume", what=what)[0] == 0
    assert numbers(user / "cut.json") == numbers(user / "full.json")
    assert resumed.calls == full_calls - (stop - 1)  # nothing spent before the interrupt is recomputed
    assert not (user / "cut.json.partial").exists()


def test_resume_with_other_options_is_refused(user, capsys, monkeypatch):
    Counter(monkeypatch, stop=5)
    assert analyze(user, capsys, "--json", str(user / "o.json"), "--quiet")[0] == 130
    code, _, err = analyze(user, capsys, "--json", str(user / "o.json"), "--quiet", "--resume", "--seed", "1")
    assert code == 1 and "delete it or drop --resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = analyze(user, capsys, "--quiet", "--resume")
    assert code == 2 and "--resume needs --json FILE" in err


def test_replay_checks_every_input_block():
    op = DenseOperator(torch.diag(torch.arange(1.0, 5.0)))
    recorder = RecordingOperator(op)
    first = recorder.matmat(torch.eye(4)[:, :2])
    replay = RecordingOperator(op, recorder.log)
    assert torch.equal(replay.matmat(torch.eye(4)[:, :2]), first) and replay.computed == 0 and op.hvps == 2
    with pytest.raises(ReplayMismatchError):
        RecordingOperator(op, recorder.log).matmat(torch.ones(4, 2))


def test_compare_takes_the_data_forms_and_the_loss(user, capsys):
    bag = str(user / "bag.pt")
    code = main(
        [
            "compare",
            bag,
            bag,
            "--model",
            "ri_user:make_bag",
            "--data",
            "ri_user:loader",
            "--loss",
            "mse",
            "--max-hvps",
            "12",
            "--quiet",
            "--json",
            str(user / "c.json"),
        ]
    )
    capsys.readouterr()
    assert code == 0
    result = json.loads((user / "c.json").read_text())
    # the same weights twice with common probes: the paired difference is exactly zero
    assert result["pairs"][0]["difference"] == 0.0 and result["traces"][0]["estimate"] > 0


def test_an_analysis_too_big_to_log_is_recomputed_but_finished_ones_are_kept(user, capsys, monkeypatch):
    import hessian_tools.app.pipeline as pipeline

    full = Counter(monkeypatch)
    assert analyze(user, capsys, "--json", str(user / "full.json"), "--quiet")[0] == 0
    full_calls = full.calls
    alone = Counter(monkeypatch)
    assert analyze(user, capsys, "--quiet", what="trace")[0] == 0
    trace_calls = alone.calls
    monkeypatch.setattr(pipeline, "LOG_LIMIT_BYTES", 0)
    Counter(monkeypatch, stop=8)  # in eigs, as above
    assert analyze(user, capsys, "--json", str(user / "cut.json"))[0] == 130
    resumed = Counter(monkeypatch)
    code, _, err = analyze(user, capsys, "--json", str(user / "cut.json"), "--resume")
    assert code == 0 and "GiB to log" in err and "finished before" in err
    assert numbers(user / "cut.json") == numbers(user / "full.json")
    assert resumed.calls == full_calls - trace_calls  # eigs is paid again in full, the trace is not
