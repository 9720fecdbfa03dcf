"""Small models for 8×8 images (and flat feature vectors), a torchvision-layout ResNet-18, plus a
registry and a factory loader.

Every small model names its final linear layer ``head``, so a fine-tuning run can re-initialise
exactly the ``head.*`` entries of a pre-trained state_dict. ``ResNet18`` keeps torchvision's names
(its classifier is ``fc``) so that checkpoints of ``torchvision.models.resnet18`` load into it.

Default sizes for 1×8×8 inputs and 10 classes:

* ``MLP()``          — 64 → 64 → 10, 4,810 parameters;
* ``SmallCNN()``     — conv(1→8)·pool·conv(8→16)·pool → 64 features → head, 1,898 parameters;
* ``SmallResNet()``  — stem conv(1→8) + 2 BasicBlocks (8 ch at 8×8, 16 ch at 4×4) + global
  average pool + head, 5,122 parameters (BatchNorm running statistics are buffers, not parameters);
* ``ResNet18()``     — torchvision's ResNet-18 for 3×224×224 (any size ≥ 32 works), 11,689,512
  parameters for 1,000 classes; ``cifar_stem=True`` for 32×32 images.

Models are built with PyTorch's default initialisation, which draws from the global RNG; callers
that need reproducibility without touching the global RNG wrap construction in
:func:`seeded_build` (``torch.random.fork_rng`` + ``manual_seed``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ...checks import check_integer
from ...errors import HessianToolsError

__all__ = [
    "MLP",
    "SmallCNN",
    "SmallResNet",
    "BasicBlock",
    "ResNet18",
    "ModelSpecError",
    "MODELS",
    "build_model",
    "load_factory",
    "seeded_build",
    "count_parameters",
]


class ModelSpecError(HessianToolsError, ValueError):
    """An unknown model name, or a ``module:function`` factory that cannot be imported or used."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MLP(nn.Module):
    """Flatten → [Linear → ReLU] × len(hidden) → ``head`` (Linear)."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (64,), num_classes: int = 10):
        super().__init__()
        _check_positive(num_classes=num_classes, in_features=in_features)
        hidden = tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        width = int(in_features)
        for h in hidden:
            _check_positive(hidden=h)
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.in_features = int(in_features)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects {self.in_features} input features, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """conv3×3(in→c)·[BN]·ReLU·maxpool2 → conv3×3(c→2c)·[BN]·ReLU·maxpool2 → flatten → ``head``.

    Sized for 8×8 inputs (8 → 4 → 2 spatially); other sizes work when divisible by 4
    (``image_size`` sets the head's input width).
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 8,
        batchnorm: bool = False,
        in_channels: int = 1,
        image_size: int = 8,
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, channels=channels, in_channels=in_channels)
        if image_size < 4 or image_size % 4:
            raise ValueError(
                f"SmallCNN needs an image size divisible by 4 (two 2×2 poolings), got {image_size}"
            )
        c = int(channels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                mods.append(nn.BatchNorm2d(cout))
            return mods + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(int(in_channels), c), *block(c, 2 * c))
        self.head = nn.Linear(2 * c * (image_size // 4) ** 2, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_as_image(x)).flatten(1))


class BasicBlock(nn.Module):
    """conv3×3·BN·ReLU·conv3×3·BN + skip, then ReLU; 1×1 conv + BN on the skip when the shape changes.

    The projection is stored as ``shortcut`` (this zoo's small ResNet) or, with
    ``skip_name="downsample"``, under torchvision's name (``downsample.0``/``downsample.1``); an
    identity skip adds no state_dict entries either way.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, skip_name: str = "shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            skip: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            skip = nn.Identity()
        self.skip_name = skip_name
        setattr(self, skip_name, skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + getattr(self, self.skip_name)(x))


class SmallResNet(nn.Module):
    """stem conv3×3·BN·ReLU → stages of BasicBlocks → global average pool → ``head``.

    ``blocks[i]`` BasicBlocks in stage i, with ``width·2**i`` channels; every stage after the first
    halves the spatial size (8×8 → 4×4 with the default two stages).
    """

    def __init__(
        self, num_classes: int = 10, width: int = 8, blocks: Sequence[int] = (1, 1), in_channels: int = 1
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, width=width, in_channels=in_channels)
        blocks = tuple(int(b) for b in blocks)
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(
                f"SmallResNet needs at least one stage and ≥1 block per stage, got blocks={blocks}"
            )
        w = int(width)
        self.stem = nn.Sequential(
            nn.Conv2d(int(in_channels), w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = w
        for i, n in enumerate(blocks):
            cout = w * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(_as_image(x)))
        return self.head(self.pool(out).flatten(1))


class ResNet18(nn.Module):
    """ResNet-18 (He, Zhang, Ren, Sun 2016, "Deep residual learning for image recognition") with
    torchvision's module layout, so its ``state_dict`` keys and shapes are those of
    ``torchvision.models.resnet18``: ``conv1``, ``bn1``, ``layer1.0.conv1`` … ``layer4.1.bn2``,
    ``layerN.0.downsample.0/1`` (N = 2, 3, 4) and the classifier ``fc`` (not ``head``).

    62 parameter tensors and 20 BatchNorm layers (60 buffers), 122 state_dict entries;
    11,689,512 parameters for 1,000 classes, 11,181,642 for 10.

    ``cifar_stem=True`` is the variant commonly trained on 32×32 images: a 3×3 stride-1 ``conv1``
    and no max-pool (11,173,962 parameters for 10 classes; 16× the activations of the standard
    stem on the same input). Initialisation as torchvision's: Kaiming-normal (fan-out) convolutions,
    BatchNorm weight 1 and bias 0, PyTorch's default for ``fc``.
    """

    widths = (64, 128, 256, 512)

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, cifar_stem: bool = False):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        if cifar_stem:
            self.conv1 = nn.Conv2d(int(in_channels), 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(int(in_channels), 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, cout in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(
                BasicBlock(cin, cout, stride, skip_name="downsample"),
                BasicBlock(cout, cout, 1, skip_name="downsample"),
            )
            self.add_module(f"layer{i + 1}", stage)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, int(num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(torch.relu(self.bn1(self.conv1(_as_image(x)))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """Accept (N, C, H, W), or (N, 64) flat digits (reshaped to N×1×8×8)."""
    if x.ndim == 4:
        return x
    if x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])
        return x.reshape(x.shape[0], 1, side, side)
    raise ValueError(
        "convolutional models expect images (N, C, H, W) or flat square images (N, H·W), "
        f"got shape {tuple(x.shape)}"
    )


def _check_positive(**values) -> None:
    for name, value in values.items():
        check_integer(name, value)


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet": SmallResNet,
    "resnet18": ResNet18,
}


def build_model(name: str, num_classes: int, input_shape: Sequence[int] | None = None, **kw) -> nn.Module:
    """Build ``name`` ("mlp", "cnn", "resnet", or a "module:function" factory) for ``num_classes``.

    ``input_shape`` (one sample's shape, e.g. ``(1, 8, 8)`` or ``(10,)``) fills in ``in_features``
    (MLP) or ``in_channels``/``image_size`` (CNN, ResNet) unless ``kw`` sets them. A factory is called
    as ``factory(num_classes=num_classes, **kw)`` and must return an ``nn.Module``.
    """
    if not isinstance(name, str) or not name:
        raise ModelSpecError(f"model must be a name ({', '.join(MODELS)}) or 'module:function', got {name!r}")
    if ":" in name:
        factory = load_factory(name)
        try:
            model = factory(num_classes=int(num_classes), **kw)
        except TypeError as exc:
            raise ModelSpecError(
                f"model factory {name} could not be called as f(num_classes=..., **model_kwargs): {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"model factory {name} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    key = name.lower()
    if key not in MODELS:
        raise ModelSpecError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give a 'module:function' factory"
        )
    kw = dict(kw)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if key == "mlp":
            kw.setdefault("in_features", math.prod(shape))
        elif len(shape) == 3:
            kw.setdefault("in_channels", shape[0])
            if key == "cnn":
                kw.setdefault("image_size", shape[1])
        elif len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
            if key == "cnn":
                kw.setdefault("image_size", math.isqrt(shape[0]))
        else:
            raise ModelSpecError(
                f"model {key!r} needs image inputs (C, H, W); the data has samples of shape {shape}"
            )
    try:
        return MODELS[key](num_classes=int(num_classes), **kw)
    except TypeError as exc:
        raise ModelSpecError(f"bad options for model {key!r}: {exc}") from None


@contextmanager
def _cwd_on_path():
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_factory(spec: str, error: type[Exception] = ModelSpecError) -> Callable:
    """Import ``"package.module:function"`` (or ``"path/to/file.py:function"``) and return the callable.

    The current directory is searched too (as ``python -m`` would). Any failure — no colon, a
    module that does not import, a missing or non-callable attribute — raises ``error`` (a
    ``ValueError``) with one line naming the spec.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise error(f"expected 'module:function' (e.g. 'mypkg.models:make_net'), got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise error(f"cannot import {spec!r}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"_hessian_tools_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            with _cwd_on_path():
                module = importlib.import_module(module_name)
    except error:
        raise
    except ModuleNotFoundError as exc:
        raise error(f"cannot import {spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:  # noqa: BLE001 — any import-time failure becomes one line
        raise error(
            f"cannot import {spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"cannot import {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def seeded_build(
    seed: int, name: str, num_classes: int, input_shape: Sequence[int] | None = None, **kw
) -> nn.Module:
    """:func:`build_model` with the initialisation drawn from ``manual_seed(seed)``, leaving the global RNG
    as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(name, num_classes, input_shape=input_shape, **kw)
