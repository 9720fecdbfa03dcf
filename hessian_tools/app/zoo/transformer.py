"""A small transformer text classifier that is called the way Hugging Face models are.

``TextClassifier()(input_ids=..., attention_mask=...)`` returns a :class:`ClassifierOutput`, a
dict ``{"logits": (N, num_classes)}`` that also reads as ``.logits``, so code written for
``transformers`` sequence classifiers can be pointed at it unchanged.

Architecture (Vaswani et al. 2017, pre-LayerNorm as in Xiong et al. 2020): token embedding +
learned position embedding → ``num_layers`` encoder layers (``torch.nn.TransformerEncoderLayer``,
multi-head self-attention + GELU feed-forward, LayerNorm before each sub-layer) → a final LayerNorm
→ the mean of the hidden states over the unmasked tokens → a linear ``head``. Defaults (vocabulary
2,000, 64 positions, d_model 128, 4 heads, feed-forward 512, 2 layers, 2 classes): 661,250 parameters.

Dropout is 0 by default: a Hessian is only a fixed matrix when the forward pass is deterministic.
Attention runs on PyTorch's math kernel of ``scaled_dot_product_attention``: the fused CPU kernel
(flash attention) has neither a second derivative nor a forward-mode one, which every
Hessian-vector product needs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["ClassifierOutput", "TextClassifier"]


class ClassifierOutput(dict):
    """``{"logits": tensor}`` with attribute access (``out.logits``), like ``transformers``' ModelOutput."""

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class TextClassifier(nn.Module):
    """Token + position embeddings → pre-LN transformer encoder → masked mean pooling → ``head``.

    ``input_ids`` (N, L) int64 in [0, vocab_size) with L ≤ max_len; ``attention_mask`` (N, L), 1 for
    real tokens and 0 for padding (default: all ones). Padded positions are neither attended to
    nor pooled, so their token ids do not change the output.
    """

    def __init__(
        self,
        num_classes: int = 2,
        vocab_size: int = 2000,
        max_len: int = 64,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("vocab_size", vocab_size),
            ("max_len", max_len),
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
            ("dim_feedforward", dim_feedforward),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.max_len = int(max_len)
        self.token_embedding = nn.Embedding(int(vocab_size), int(d_model))
        self.position_embedding = nn.Embedding(self.max_len, int(d_model))
        layer = nn.TransformerEncoderLayer(
            int(d_model),
            int(num_heads),
            int(dim_feedforward),
            dropout=float(dropout),
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, int(num_layers), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(int(d_model))
        self.head = nn.Linear(int(d_model), int(num_classes))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ClassifierOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequences of length {length} exceed max_len={self.max_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)
        with sdpa_kernel(SDPBackend.MATH):
            hidden = self.encoder(hidden, src_key_padding_mask=attention_mask == 0)
        hidden = self.norm(hidden)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return ClassifierOutput(logits=self.head(pooled))
