"""Models and data of the scale benchmark (analysis/bench_scale.py), as factories the command line
imports: ``--model analysis/scale_models.py:resnet18 --data analysis/scale_models.py:cifar_images``.

* ``resnet18`` — the zoo's torchvision-layout ResNet-18 with its standard stem (7×7 stride-2
  conv + max-pool), 11,181,642 parameters for 10 classes; ``resnet18_cifar`` is the 3×3-stem,
  no-max-pool variant (11,173,962 parameters, 16× the activations on 32×32 inputs).
* ``cifar_images`` — 128 CIFAR-shaped (3×32×32) training images of 10 classes, seeded: each class
  has a fixed random mean image, each sample adds unit Gaussian noise; 64 test images.
* ``text_classifier`` / ``text_batches`` — the zoo's transformer classifier and seeded synthetic
  text, batches whose inputs are dicts ``{"input_ids", "attention_mask"}``.

``*_tiny`` variants are the benchmark's ``--quick`` sizes (``resnet_tiny`` is a small ResNet, not a
ResNet-18). :class:`PackedTextInputs` adapts the dict-input transformer to code that calls
``model(inputs)`` with one tensor and needs a tensor out (PyHessian).
"""

from __future__ import annotations

import torch
from torch import nn

from hessian_tools.app.zoo.data import TextData, synthetic_text
from hessian_tools.app.zoo.models import ResNet18, SmallResNet
from hessian_tools.app.zoo.transformer import TextClassifier
from hessian_tools.operators.empirical_risk import model_output

IMAGE_SHAPE = (3, 32, 32)
TEXT = {
    "full": dict(n=64, vocab_size=2000, min_len=8, max_len=32, num_classes=2, seed=0),
    "tiny": dict(n=12, vocab_size=100, min_len=3, max_len=10, num_classes=2, seed=0),
}
TEXT_MODEL = {
    "full": dict(vocab_size=2000, max_len=32),
    "tiny": dict(vocab_size=100, max_len=10, d_model=16, num_heads=2, dim_feedforward=32),
}
TEXT_BATCH = {"full": 24, "tiny": 5}  # uneven last batches: 24+24+16 and 5+5+2


def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes=num_classes)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes=num_classes, cifar_stem=True)


def resnet_tiny(num_classes: int = 10) -> nn.Module:
    """The ``--quick`` stand-in for ResNet-18: the zoo's small ResNet (BatchNorm, skips), 3 channels."""
    return SmallResNet(num_classes=num_classes, width=4, in_channels=3)


def _images(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, *IMAGE_SHAPE, generator=gen)
    y = torch.arange(n) % num_classes
    return means[y] + torch.randn(n, *IMAGE_SHAPE, generator=gen), y


def cifar_images(n_train: int = 128, n_test: int = 64, num_classes: int = 10, seed: int = 0) -> dict:
    """``{"train": (X, y), "test": (X, y), "num_classes": 10}`` with the same class means in both splits."""
    X, y = _images(n_train + n_test, num_classes, seed)
    return {
        "train": (X[:n_train], y[:n_train]),
        "test": (X[n_train:], y[n_train:]),
        "num_classes": num_classes,
        "name": f"cifar-shaped synthetic ({n_train} images)",
    }


def cifar_images_tiny() -> dict:
    return cifar_images(n_train=4, n_test=4)


def text_classifier(num_classes: int = 2) -> nn.Module:
    return TextClassifier(num_classes=num_classes, **TEXT_MODEL["full"])


def text_classifier_tiny(num_classes: int = 2) -> nn.Module:
    return TextClassifier(num_classes=num_classes, num_layers=2, **TEXT_MODEL["tiny"])


def text_data(size: str = "full") -> TextData:
    return synthetic_text(**TEXT[size])


def text_batches() -> list[tuple[dict, torch.Tensor]]:
    """The benchmark's text batches: ``[({"input_ids", "attention_mask"}, labels), ...]``."""
    return text_data("full").batches(TEXT_BATCH["full"])


def text_batches_tiny() -> list[tuple[dict, torch.Tensor]]:
    return text_data("tiny").batches(TEXT_BATCH["tiny"])


class PackedTextInputs(nn.Module):
    """``wrapper(packed)`` with ``packed`` (N, 2, L) = stack(input_ids, attention_mask): one tensor in,
    logits out, for code that calls ``inputs.size(0)`` and ``model(inputs)`` (PyHessian)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def pack(inputs: dict) -> torch.Tensor:
        return torch.stack([inputs["input_ids"], inputs["attention_mask"]], dim=1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return model_output(self.model(input_ids=packed[:, 0], attention_mask=packed[:, 1]))
