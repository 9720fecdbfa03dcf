"""Checkpoint formats: every common way of saving a model loads into it with the same weights — so the
same seeded trace estimate, bit for bit — and anything that does not fit exactly is refused in one
plain line.

Lightning-style files are built by hand (Lightning is not needed): a ``state_dict`` entry with the
LightningModule's attribute prefix next to the trainer's bookkeeping.
"""

import argparse
import json
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_one_line_error, run
from torch import nn

import hessian_tools as ht
from hessian_tools.app.checkpoint_formats import plain_line
from hessian_tools.app.checkpoints import fit_state_dict, load_checkpoint, load_state_dict, resolve
from hessian_tools.app.zoo.data import load_data
from hessian_tools.app.zoo.models import build_model
from hessian_tools.errors import CheckpointError


class Net(nn.Module):
    """Linear → BatchNorm (buffers, an integer counter, version metadata) → ReLU → Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


class Wrapper(nn.Module):
    """Holds modules under given attribute names, as DDP (``module``) or a LightningModule (``model``)."""

    def __init__(self, **modules):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


def trained_net(seed):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-default buffers, so that a checkpoint that loses them shows
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(7)
    return net.eval()


def seeded_trace(model):
    generator = torch.Generator().manual_seed(123)
    X, y = torch.randn(32, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    op = ht.HessianOperator(model.eval(), F.cross_entropy, (X, y))
    return ht.trace(op, method="hutchinson", max_hvps=12, seed=0).estimate


@pytest.fixture(scope="module")
def net():
    return trained_net(0)


@pytest.fixture(scope="module")
def plain_trace(net):
    return seeded_trace(net)


def lightning_checkpoint(state_dict, hyper_parameters):
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 3}],
        "hyper_parameters": hyper_parameters,
    }


def save_safetensors(state_dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def lightning_file(net, path):
    hyper_parameters = {"lr": 0.1, "hidden": [5], "name": "n"}
    torch.save(lightning_checkpoint(Wrapper(model=net).state_dict(), hyper_parameters), path)


def lightning_file_with_ema(net, path):
    modules = Wrapper(model=net, ema_model=Wrapper(module=trained_net(9)))
    torch.save(lightning_checkpoint(modules.state_dict(), {}), path)


def model_ema_and_optimizer(net, path):
    torch.save(
        {
            "model": net.state_dict(),
            "ema": Wrapper(module=trained_net(9)).state_dict(),
            "optimizer": torch.optim.SGD(net.parameters(), momentum=0.9).state_dict(),
            "epoch": 3,
        },
        path,
    )


STRIPPED_MODULE = "stripped prefix 'module.' from 9 keys"
# name -> (writer(net, path), file name, what the note says; None = nothing to say)
FORMATS = {
    "plain": (lambda net, p: torch.save(net.state_dict(), p), "plain.pt", None),
    "ddp": (lambda net, p: torch.save(Wrapper(module=net).state_dict(), p), "ddp.pt", STRIPPED_MODULE),
    "torch.compile": (
        lambda net, p: torch.save(torch.compile(net).state_dict(), p),
        "compiled.pt",
        "stripped prefix '_orig_mod.' from 9 keys",
    ),
    "ddp of torch.compile": (
        lambda net, p: torch.save(Wrapper(module=torch.compile(net)).state_dict(), p),
        "ddp_compiled.pt",
        "stripped prefix 'module._orig_mod.' from 9 keys",
    ),
    "lightning": (
        lightning_file,
        "lightning.ckpt",
        "used entry 'state_dict'; stripped prefix 'model.' from 9 keys",
    ),
    "lightning holding an EMA copy": (
        lightning_file_with_ema,
        "lightning_ema.ckpt",
        "also fits: 'state_dict.ema_model.module'",
    ),
    "AveragedModel": (
        lambda net, p: torch.save(torch.optim.swa_utils.AveragedModel(net).state_dict(), p),
        "swa.pt",
        "left 1 other tensor(s) of the entry unused, first: n_averaged",
    ),
    "model, ema and optimizer": (
        model_ema_and_optimizer,
        "bundle.pt",
        "used entry 'model'; also fits: 'ema.module'",
    ),
    "safetensors": (lambda net, p: save_safetensors(net.state_dict(), p), "weights.safetensors", None),
    "safetensors of ddp, any extension": (
        lambda net, p: save_safetensors(Wrapper(module=net).state_dict(), p),
        "weights.bin",
        STRIPPED_MODULE,
    ),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_the_same_weights_and_gives_the_same_trace(fmt, net, plain_trace, tmp_path):
    write, name, note = FORMATS[fmt]
    path = tmp_path / name
    write(net, path)
    fresh = trained_net(1)
    fit = load_checkpoint(fresh, path)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert seeded_trace(fresh) == plain_trace  # identical weights: the same number, exactly
    if note is None:
        assert fit.note is None
    else:
        assert note in fit.note and str(path) in fit.note


def test_an_ema_copy_is_loaded_only_when_asked_for(net, plain_trace, tmp_path):
    ema = trained_net(9)
    path = tmp_path / "bundle.pt"
    torch.save({"model": net.state_dict(), "ema": Wrapper(module=ema).state_dict()}, path)
    fresh = trained_net(1)
    fit = load_checkpoint(fresh, path, key="ema")
    assert fit.entry == "ema" and fit.prefix == "module." and fit.also_fits == ()
    assert seeded_trace(fresh) == seeded_trace(ema) != plain_trace


def test_two_equally_plausible_state_dicts_are_refused_until_one_is_chosen(net):
    checkpoint = {"student": net.state_dict(), "teacher": trained_net(2).state_dict()}
    with pytest.raises(CheckpointError, match="several state_dicts that fit.*'student', 'teacher'.*-key"):
        fit_state_dict(trained_net(1), checkpoint)
    fit = fit_state_dict(trained_net(1), checkpoint, key="teacher")
    assert fit.entry == "teacher"
    assert torch.equal(fit.state_dict["fc.weight"], checkpoint["teacher"]["fc.weight"])
    with pytest.raises(CheckpointError, match="no state_dict at 'ema'.*'student', 'teacher'"):
        fit_state_dict(trained_net(1), checkpoint, key="ema")


def test_a_prefix_carried_by_only_some_keys_is_not_stripped(net):
    mixed = OrderedDict((f"module.{k}" if k.startswith("fc.") else k, v) for k, v in net.state_dict().items())
    with pytest.raises(CheckpointError, match="does not fit the model: .*missing.*fc.weight.*unexpected"):
        fit_state_dict(trained_net(1), mixed)


def test_a_prefix_is_not_stripped_when_the_keys_already_fit():
    torch.manual_seed(0)
    inner = Wrapper(module=nn.Linear(3, 2))  # its own parameters are called module.weight, module.bias
    fit = fit_state_dict(Wrapper(module=nn.Linear(3, 2)), inner.state_dict())
    assert fit.prefix == "" and fit.note is None and list(fit.state_dict) == ["module.weight", "module.bias"]
    fit = fit_state_dict(Wrapper(module=nn.Linear(3, 2)), Wrapper(module=inner).state_dict())
    assert fit.prefix == "module." and list(fit.state_dict) == ["module.weight", "module.bias"]


@pytest.mark.parametrize(
    "damage, needle",
    [
        (
            lambda sd: sd.pop("module.bn.running_var"),
            "1 key(s) missing from the checkpoint, first: bn.running_var",
        ),
        (
            lambda sd: sd.__setitem__("module.extra.weight", torch.zeros(2)),
            "1 unexpected key(s), first: extra.weight",
        ),
        (
            lambda sd: sd.__setitem__("module.head.bias", torch.zeros(4)),
            "1 shape mismatch(es), first: head.bias: checkpoint (4,) vs model (3,)",
        ),
    ],
)
def test_a_partial_fit_after_stripping_is_refused_naming_the_misfit(net, damage, needle):
    state_dict = Wrapper(module=net).state_dict()
    damage(state_dict)
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(trained_net(1), {"state_dict": state_dict}, source="ddp.ckpt")
    message = str(info.value)
    where = "(entry 'state_dict') after stripping prefix 'module.'"
    assert message.startswith(f"ddp.ckpt does not fit the model {where}: ")
    assert needle in message and "\n" not in message


def test_torch_version_metadata_follows_the_stripped_prefix(net):
    fit = fit_state_dict(trained_net(1), Wrapper(module=net).state_dict())
    assert dict(fit.state_dict._metadata) == dict(net.state_dict()._metadata)  # bn keeps its version 2


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale_info = {"calibrated": False}

    def get_extra_state(self):
        return self.scale_info

    def set_extra_state(self, state):
        self.scale_info = dict(state)


def test_non_tensor_entries_are_kept_when_the_model_owns_them_and_ignored_otherwise(tmp_path):
    saved = WithExtraState()
    saved.scale_info = {"calibrated": True}
    state_dict = Wrapper(model=saved).state_dict()
    state_dict["model.note"] = "framework metadata, not weights"
    path = tmp_path / "extra.ckpt"
    torch.save(lightning_checkpoint(state_dict, {}), path)
    fresh = WithExtraState()
    fit = load_checkpoint(fresh, path)
    assert fresh.scale_info == {"calibrated": True} and "note" not in fit.state_dict
    assert torch.equal(fresh.fc.weight, saved.fc.weight)


def install_fake_lightning():
    """Make ``lightning.fabric.utilities.data.AttributeDict`` importable for torch.save (only)."""
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
    modules = {name: types.ModuleType(name) for name in names}

    class AttributeDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as exc:
                raise AttributeError(key) from exc

    AttributeDict.__module__, AttributeDict.__qualname__ = names[-1], "AttributeDict"
    modules[names[-1]].AttributeDict = AttributeDict
    sys.modules.update(modules)
    return AttributeDict, names


def test_lightning_hyper_parameters_in_an_attribute_dict_or_namespace_load_without_lightning(net, tmp_path):
    AttributeDict, names = install_fake_lightning()
    path = tmp_path / "hparams.ckpt"
    try:
        hparams = AttributeDict(lr=0.1, args=argparse.Namespace(batch_size=32, tags=["a"]))
        torch.save(lightning_checkpoint(Wrapper(model=net).state_dict(), hparams), path)
    finally:
        for name in names:
            del sys.modules[name]
    fresh = trained_net(1)
    fit = load_checkpoint(fresh, path)
    assert fit.prefix == "model." and torch.equal(fresh.head.weight, net.head.weight)
    assert "lightning" not in sys.modules  # allowed by name, never imported


class Config:
    """A user's config object in hyper_parameters: weights_only refuses to build it."""

    def __init__(self):
        self.lr = 0.1


def test_lightning_checkpoint_with_a_custom_class_explains_the_one_line_resave(net, tmp_path):
    path = tmp_path / "run.ckpt"
    torch.save(lightning_checkpoint(Wrapper(model=net).state_dict(), {"config": Config()}), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(trained_net(1), path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert f"refused to load {path}" in message and f"{__name__}.Config" in message
    resave = (
        f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
        f"torch.save(c['state_dict'], '{tmp_path / 'run.pt'}')\""
    )
    assert message.endswith(resave)


def test_a_whole_pickled_module_is_refused_in_one_plain_line(net, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(trained_net(1), path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert "a whole pickled module" in message and "weights_only=False).state_dict(), " in message


def test_plain_line_removes_ansi_codes_and_keeps_one_line():
    torch_style = "\x1b[1mdo this\x1b[0m only if you trust it\n\tdetails"
    assert plain_line(torch_style) == "do this only if you trust it"
    assert plain_line("x" * 300, limit=10) == "x" * 9 + "…"


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt"])
def test_a_file_that_is_no_checkpoint_gets_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json, truncated")
    with pytest.raises(CheckpointError, match="is not a readable") as info:
        load_checkpoint(trained_net(1), path)
    assert "\n" not in str(info.value)


def test_model_free_loading_returns_the_state_dict_entry(net, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save(lightning_checkpoint(Wrapper(model=net).state_dict(), {}), path)
    assert sorted(load_state_dict(path)) == sorted(f"model.{k}" for k in net.state_dict())


def test_a_wrapped_prior_is_unwrapped_like_the_checkpoint(tmp_path):
    bundle = load_data("builtin:synthetic")
    torch.manual_seed(0)
    model = build_model("mlp", bundle.num_classes, bundle.input_shape)
    torch.save(Wrapper(module=model).state_dict(), tmp_path / "ddp.pt")
    torch.save({"state_dict": Wrapper(model=model).state_dict()}, tmp_path / "prior.ckpt")
    loaded = resolve(str(tmp_path / "ddp.pt"), "mlp", "builtin:synthetic", prior=str(tmp_path / "prior.ckpt"))
    assert sorted(loaded.prior) == sorted(model.state_dict())
    assert len(loaded.notes) == 2 and "'module.'" in loaded.notes[0] and "'model.'" in loaded.notes[1]


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """The same zoo MLP saved plainly, DDP-wrapped and as Lightning-prefixed safetensors."""
    folder = tmp_path_factory.mktemp("formats")
    bundle = load_data("builtin:synthetic")
    torch.manual_seed(3)
    model = build_model("mlp", bundle.num_classes, bundle.input_shape)
    torch.save(model.state_dict(), folder / "plain.pt")
    torch.save(Wrapper(module=model).state_dict(), folder / "ddp.pt")
    save_safetensors(Wrapper(model=model).state_dict(), folder / "model.safetensors")
    return folder


def analyze_trace(path):
    proc = run(
        "analyze",
        str(path),
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--what",
        "trace",
        "--max-hvps",
        "20",
        "--json",
        "-",
        "--quiet",
    )
    return json.loads(proc.stdout[proc.stdout.index("{") :])["trace"]["estimate"], proc.stderr


@pytest.fixture(scope="module")
def cli_plain_trace(cli_files):
    estimate, stderr = analyze_trace(cli_files / "plain.pt")
    assert "note:" not in stderr  # a plain state_dict needs no explanation
    return estimate


@pytest.mark.parametrize(
    "name, note",
    [
        ("ddp.pt", "note: stripped prefix 'module.' from 4 keys"),
        ("model.safetensors", "note: stripped prefix 'model.' from 4 keys"),
    ],
)
def test_cli_analyzes_a_wrapped_checkpoint_with_the_same_trace_and_says_what_it_stripped(
    cli_files, cli_plain_trace, name, note
):
    estimate, stderr = analyze_trace(cli_files / name)
    assert estimate == cli_plain_trace
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(note), stderr


def test_cli_refuses_an_ambiguous_checkpoint_in_one_line(cli_files, tmp_path):
    plain = torch.load(cli_files / "plain.pt", weights_only=True)
    torch.save({"student": plain, "teacher": plain}, tmp_path / "two.pt")
    proc = run(
        "analyze",
        str(tmp_path / "two.pt"),
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--what",
        "trace",
        check=False,
    )
    assert_one_line_error(proc, 1, "several state_dicts", "--checkpoint-key")
