"""Models (shapes, parameter counts, registry, factories) and data (digits splits, specs, batches)."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

from hessian_tools.app.zoo.data import (
    DataBundle,
    batches,
    digits_finetune,
    digits_full,
    digits_pretrain,
    load_data,
    load_digits,
    synthetic_classification,
    synthetic_text,
)
from hessian_tools.app.zoo.models import (
    MLP,
    ModelSpecError,
    ResNet18,
    SmallCNN,
    SmallResNet,
    build_model,
    count_parameters,
    load_factory,
    seeded_build,
)
from hessian_tools.errors import DataError, HessianToolsError

# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name, expected", [("mlp", 4810), ("cnn", 1898), ("resnet", 5122)])
def test_models_shapes_and_param_counts(name, expected):
    model = build_model(name, 10)
    assert count_parameters(model) == expected
    assert model(torch.rand(7, 1, 8, 8)).shape == (7, 10)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 10
    assert any(k.startswith("head.") for k in model.state_dict())


def test_model_sizes_in_the_requested_ranges():
    assert 1000 <= count_parameters(SmallCNN(10)) <= 3000
    assert 1000 <= count_parameters(SmallCNN(10, batchnorm=True)) <= 3000
    assert 5000 <= count_parameters(SmallResNet(10)) <= 15000
    assert 5000 <= count_parameters(SmallResNet(10, blocks=(2, 2))) <= 15000


def test_resnet_has_projection_shortcut_only_where_shape_changes():
    net = SmallResNet(5)
    first, second = net.layers[0], net.layers[1]
    assert isinstance(first.shortcut, torch.nn.Identity)
    assert isinstance(second.shortcut, torch.nn.Sequential)
    assert isinstance(second.shortcut[0], torch.nn.Conv2d) and second.shortcut[0].kernel_size == (1, 1)
    assert isinstance(second.shortcut[1], torch.nn.BatchNorm2d)


def test_models_accept_flat_digits_and_input_shape():
    x = torch.rand(3, 64)
    for name in ("mlp", "cnn", "resnet"):
        assert build_model(name, 4)(x).shape == (3, 4)
    mlp = build_model("mlp", 3, input_shape=(10,), hidden=[16, 8])
    assert mlp(torch.rand(5, 10)).shape == (5, 3)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [16, 8, 3]
    with pytest.raises(ValueError, match="64 input features"):
        MLP()(torch.rand(2, 10))
    with pytest.raises(ModelSpecError, match="image inputs"):
        build_model("cnn", 3, input_shape=(10,))


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = seeded_build(5, "resnet", 10)
    b = seeded_build(5, "resnet", 10)
    c = seeded_build(6, "resnet", 10)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_model_and_bad_options():
    with pytest.raises(ModelSpecError, match="unknown model 'vgg'.*mlp, cnn, resnet"):
        build_model("vgg", 10)
    with pytest.raises(ModelSpecError, match="bad options for model 'mlp'"):
        build_model("mlp", 10, depth=3)
    assert issubclass(ModelSpecError, HessianToolsError) and issubclass(ModelSpecError, ValueError)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user module on sys.path with a model factory and data loaders."""
    (tmp_path / "ht_user_mod.py").write_text(
        textwrap.dedent("""
        import torch
        from hessian_tools.app.zoo.data import DataBundle

        def make_net(num_classes, width=4):
            net = torch.nn.Sequential()
            net.body = torch.nn.Linear(64, width)
            net.head = torch.nn.Linear(width, num_classes)
            return torch.nn.Sequential(torch.nn.Flatten(), net)

        def not_a_model(num_classes):
            return 3

        def bundle():
            g = torch.Generator().manual_seed(0)
            X = torch.randn(20, 5, generator=g)
            return DataBundle((X[:15], torch.arange(15) % 2), (X[15:], torch.arange(5) % 2), 2, "mine")

        def as_dict():
            return {"train": ([[0.0, 1.0], [1.0, 0.0]], [0, 1]), "test": ([[0.5, 0.5]], [1]),
                    "num_classes": 2}

        def missing_key():
            return {"train": ([[0.0]], [0])}

        def bad_labels():
            return {"train": ([[0.0]], [5]), "test": ([[0.0]], [0]), "num_classes": 2}

        def broken():
            raise RuntimeError("disk on fire")

        CONSTANT = 4
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ht_user_mod"
    sys.modules.pop("ht_user_mod", None)


def test_factory_models(user_module, tmp_path):
    model = build_model(f"{user_module}:make_net", 3, width=6)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert load_factory(f"{user_module}:make_net") is sys.modules[user_module].make_net
    by_file = load_factory(f"{tmp_path / 'ht_user_mod.py'}:make_net")
    assert callable(by_file)
    with pytest.raises(ModelSpecError, match="returned int, not a torch.nn.Module"):
        build_model(f"{user_module}:not_a_model", 3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("ht_user_mod:nope", "has no attribute 'nope'"),
        ("ht_user_mod:CONSTANT", "is not callable"),
        ("justaname", "expected 'module:function'"),
        ("a:b:c", "expected 'module:function'"),
        ("/no/such/file.py:f", "no such file"),
    ],
)
def test_load_factory_errors_are_one_line(user_module, spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        load_factory(spec)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- data


def test_load_digits():
    X, y = load_digits()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    # the first digit of scikit-learn's set is a 0 with pixel (0, 2) = 5/16
    assert int(y[0]) == 0 and float(X[0, 0, 0, 2]) == pytest.approx(5 / 16)


def _rows(X):
    return {tuple(row.tolist()) for row in X.flatten(1)}


def _multiset(X):
    return sorted(map(tuple, X.flatten(1).tolist()))


def test_digits_full_split():
    b = digits_full()
    assert b.num_classes == 10 and b.name == "digits"
    assert b.train[0].shape == (1438, 1, 8, 8) and b.test[0].shape == (359, 1, 8, 8)
    X, _ = load_digits()
    # the union of the split is exactly the data set (as a multiset of rows)
    assert _multiset(X) == _multiset(torch.cat([b.train[0], b.test[0]]))


def test_digits_pretrain_split():
    b = digits_pretrain()
    assert b.num_classes == 5
    n = b.train[0].shape[0] + b.test[0].shape[0]
    X, y = load_digits()
    assert n == int((y < 5).sum()) == 901
    assert b.test[0].shape[0] == round(0.2 * 901)
    for _, labels in (b.train, b.test):
        assert int(labels.min()) >= 0 and int(labels.max()) <= 4
    assert sorted(b.train[1].unique().tolist()) == [0, 1, 2, 3, 4]


def test_digits_finetune_split_is_low_sample_and_disjoint():
    b = digits_finetune(per_class=20)
    assert b.num_classes == 5
    assert torch.bincount(b.train[1], minlength=5).tolist() == [20] * 5
    X, y = load_digits()
    assert b.train[0].shape[0] + b.test[0].shape[0] == int((y >= 5).sum())
    assert int(b.test[1].min()) == 0 and int(b.test[1].max()) == 4
    # relabelling: class 0 of the fine-tune task is digit 5
    digit5 = _rows(X[y == 5])
    assert _rows(b.train[0][b.train[1] == 0]) <= digit5
    # no image of digits 0-4 appears in the fine-tune task, and pretrain has no image of 5-9
    low, high = _rows(X[y < 5]), _rows(X[y >= 5])
    assert not (_rows(b.train[0]) | _rows(b.test[0])) & (low - high)
    pre = digits_pretrain()
    assert not (_rows(pre.train[0]) | _rows(pre.test[0])) & (high - low)
    with pytest.raises(DataError, match="per_class must be in"):
        digits_finetune(per_class=500)


def test_train_test_disjoint_by_index():
    # The splits permute indices; apply the same split to an index tag to see which samples went where.
    from hessian_tools.app.zoo.data import _split

    idx = torch.arange(901)
    (tr, _), (te, _) = _split(idx[:, None], idx, seed=3)
    tr, te = set(tr.flatten().tolist()), set(te.flatten().tolist())
    assert not tr & te and tr | te == set(range(901))
    # and the pretrain split is a partition of the digits 0-4 (as a multiset of images)
    X, y = load_digits()
    b = digits_pretrain(seed=3)
    assert _multiset(torch.cat([b.train[0], b.test[0]])) == _multiset(X[y < 5])
    ft = digits_finetune(seed=3, per_class=7)
    assert _multiset(torch.cat([ft.train[0], ft.test[0]])) == _multiset(X[y >= 5])
    assert torch.equal(torch.cat([ft.train[1], ft.test[1]]).sort().values, (y[y >= 5] - 5).sort().values)


def test_splits_are_deterministic_under_the_seed():
    for fn in (digits_full, digits_pretrain, digits_finetune, synthetic_classification):
        a, b, c = fn(seed=1), fn(seed=1), fn(seed=2)
        assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
        assert not torch.equal(a.train[0], c.train[0])


def test_synthetic_classification():
    b = synthetic_classification(n=100, d=7, num_classes=4, seed=0)
    assert b.train[0].shape == (80, 7) and b.test[0].shape == (20, 7)
    assert b.num_classes == 4 and b.input_shape == (7,)
    assert b.train[0].dtype == torch.float32 and b.train[1].dtype == torch.int64


def test_load_data_builtins_and_options():
    assert load_data("builtin:digits").test[0].shape[0] == 359
    assert load_data("builtin:digits-pretrain").num_classes == 5
    ft = load_data("builtin:digits-finetune?per_class=10&seed=4")
    assert torch.bincount(ft.train[1]).tolist() == [10] * 5
    assert torch.equal(ft.train[0], digits_finetune(seed=4, per_class=10).train[0])
    assert load_data("builtin:synthetic?n=60&d=3").train[0].shape == (48, 3)


def test_load_data_user_functions(user_module):
    b = load_data(f"{user_module}:bundle")
    assert b.name == "mine" and b.train[0].shape == (15, 5)
    d = load_data(f"{user_module}:as_dict")
    assert d.num_classes == 2 and d.train[0].dtype == torch.float32 and d.train[1].dtype == torch.int64


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:mnist", "unknown builtin dataset 'mnist'.*builtin:digits"),
        ("builtin:digits?bogus=1", "bad options for 'builtin:digits\\?bogus=1'"),
        ("builtin:digits?novalue", "bad option 'novalue'"),
        ("digits", "data spec must be"),
        ("no_such_module_xyz:load", "cannot import 'no_such_module_xyz:load': no module named"),
        ("ht_user_mod:nope", "has no attribute 'nope'"),
        ("ht_user_mod:missing_key", "without test, num_classes"),
        ("ht_user_mod:bad_labels", "outside \\[0, 1\\]"),
        ("ht_user_mod:broken", "raised RuntimeError: disk on fire"),
        ("ht_user_mod:make_net", "raised TypeError"),
    ],
)
def test_bad_data_specs_raise_one_clear_line(user_module, spec, message):
    with pytest.raises(DataError, match=message) as info:
        load_data(spec)
    assert "\n" not in str(info.value)


def test_databundle_validation():
    X = torch.zeros(4, 2)
    with pytest.raises(DataError, match="y must have shape"):
        DataBundle((X, torch.zeros(3, dtype=torch.long)), (X, torch.zeros(4, dtype=torch.long)), 2)
    with pytest.raises(DataError, match="num_classes"):
        DataBundle((X, torch.zeros(4, dtype=torch.long)), (X, torch.zeros(4, dtype=torch.long)), 1)
    with pytest.raises(DataError, match="NaN"):
        DataBundle(
            (X * float("nan"), torch.zeros(4, dtype=torch.long)), (X, torch.zeros(4, dtype=torch.long)), 2
        )
    bundle = DataBundle((X, torch.zeros(4, dtype=torch.long)), (X, torch.ones(4, dtype=torch.long)), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.num_classes = 3  # frozen


def test_batches_keep_the_uneven_last_batch():
    X, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    out = batches(X, y, 4)
    assert [len(b[1]) for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in out]), y)
    shuffled = batches(X, y, 3, generator=torch.Generator().manual_seed(0))
    assert [len(b[1]) for b in shuffled] == [3, 3, 3, 1]
    labels = torch.cat([b[1] for b in shuffled])
    assert sorted(labels.tolist()) == list(range(10)) and not torch.equal(labels, y)
    assert torch.equal(torch.cat([b[0] for b in shuffled]).flatten().long(), labels)
    assert len(batches(X, y, 100)) == 1
    with pytest.raises(ValueError, match="batch_size"):
        batches(X, y, 0)


# ----------------------------------------------------------------------------- ResNet-18 (torchvision layout)
def _torchvision_resnet18_state_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet18's state_dict, written out from its definition (torchvision is not a
    dependency): conv1 7×7/2 → bn1 → 4 stages of 2 BasicBlocks (64, 128, 256, 512 channels; the first
    block of stages 2–4 has stride 2 and a 1×1 conv + BN ``downsample``) → fc."""

    def bn(prefix, c):
        return {
            f"{prefix}.weight": (c,),
            f"{prefix}.bias": (c,),
            f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": (),
        }

    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    stages = {1: (64, 64), 2: (64, 128), 3: (128, 256), 4: (256, 512)}  # stage: (in, out) channels
    for stage, (cin, cout) in stages.items():
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (cout, cin if block == 0 else cout, 3, 3)
            shapes.update(bn(f"{p}.bn1", cout))
            shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            shapes.update(bn(f"{p}.bn2", cout))
            if block == 0 and stage > 1:
                shapes[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", cout))
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_resnet18_state_dict_has_torchvision_names_and_shapes():
    model = ResNet18()
    expected = _torchvision_resnet18_state_shapes(1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(expected) == 122 and len(list(model.parameters())) == 62
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(1 for k in expected if k.endswith(buffers)) == 60
    assert count_parameters(model) == 11_689_512  # torchvision's published count for resnet18
    assert count_parameters(ResNet18(num_classes=10)) == 11_181_642
    assert [n for n, _ in model.named_parameters()][:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]


def test_resnet18_forward_on_cifar_shaped_images_for_both_stems():
    x = torch.randn(2, 3, 32, 32)
    standard, cifar = ResNet18(num_classes=10).eval(), ResNet18(num_classes=10, cifar_stem=True).eval()
    assert standard(x).shape == (2, 10) and cifar(x).shape == (2, 10)
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, torch.nn.MaxPool2d)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert count_parameters(cifar) == 11_173_962  # 64·3·(9 − 49) fewer than the standard stem
    assert set(cifar.state_dict()) == set(standard.state_dict())


def test_build_model_makes_resnet18_for_the_data_shape():
    model = build_model("resnet18", 7, input_shape=(1, 32, 32))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7


# ----------------------------------------------------------------------------- text data with dict inputs
def test_synthetic_text_is_seeded_padded_and_labelled_by_its_rule():
    a = synthetic_text(40, vocab_size=30, min_len=3, max_len=9, num_classes=3, seed=1)
    b = synthetic_text(40, 30, 3, 9, 3, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, synthetic_text(40, 30, 3, 9, 3, seed=2).input_ids)
    lengths = a.attention_mask.sum(1)
    assert a.input_ids.shape == (40, 9) and 3 <= int(lengths.min()) and int(lengths.max()) <= 9
    assert len(set(lengths.tolist())) > 2  # lengths vary
    assert torch.equal(a.attention_mask, (torch.arange(9)[None] < lengths[:, None]).long())  # right padding
    assert bool((a.input_ids[a.attention_mask == 0] == 0).all())
    assert bool((a.input_ids[a.attention_mask == 1] > 0).all())
    for ids, n, label in zip(a.input_ids, lengths, a.labels):
        counts = torch.bincount(ids[:n] % 3, minlength=3)
        assert int(label) == int(
            torch.nonzero(counts == counts.max())[0]
        )  # biggest group, ties to the lowest
    assert len(set(a.labels.tolist())) == 3
    with pytest.raises(DataError, match="synthetic text"):
        synthetic_text(10, vocab_size=2, num_classes=2)


def test_batches_of_dict_inputs_keep_the_keys_and_the_uneven_last_batch():
    data = synthetic_text(11, vocab_size=20, min_len=2, max_len=5)
    parts = data.batches(4)
    assert [int(y.shape[0]) for _, y in parts] == [4, 4, 3]
    for x, y in parts:
        assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (int(y.shape[0]), 5)
    assert torch.equal(torch.cat([x["input_ids"] for x, _ in parts]), data.input_ids)
    shuffled = data.batches(4, generator=torch.Generator().manual_seed(0))
    ids, labels = torch.cat([x["input_ids"] for x, _ in shuffled]), torch.cat([y for _, y in shuffled])
    order = [next(i for i in range(11) if torch.equal(data.input_ids[i], row)) for row in ids]
    assert sorted(order) == list(range(11)) and torch.equal(labels, data.labels[order])
    with pytest.raises(ValueError, match=r"X\['input_ids'\] has 11 samples but y has 3"):
        batches(data.inputs, data.labels[:3], 2)
