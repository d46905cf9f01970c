"""The Vision Transformer of DINO ViT-S/16 in Paddle (the architecture of transformers' `ViTModel`: pre-norm
blocks, exact GELU, a CLS token and learned position embeddings). Paddle and ppdiffusers have none; the layer and
parameter names equal the published checkpoint's keys, so its weights load by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


@dataclass
class ViTConfig:
    """The entries of a transformers ViT `config.json` that the model reads; defaults are transformers'."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    extra: Dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "ViTConfig":
        names = set(cls.__dataclass_fields__) - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        if known.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only the exact GELU of ViT/DINO is implemented, not {known['hidden_act']!r}")
        return cls(**known, extra={k: v for k, v in config.items() if k not in names})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbeddings(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2D(config.num_channels, config.hidden_size, config.patch_size,
                                    stride=config.patch_size)

    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2).transpose([0, 2, 1])  # [n, patches, hidden]


class Embeddings(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        normal = nn.initializer.TruncatedNormal(std=0.02)
        hidden = config.hidden_size
        self.cls_token = self.create_parameter([1, 1, hidden], default_initializer=normal)
        self.position_embeddings = self.create_parameter([1, config.num_patches + 1, hidden], default_initializer=normal)
        self.patch_embeddings = PatchEmbeddings(config)

    def forward(self, pixel_values):
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"the ViT takes {size}x{size} images, got {tuple(pixel_values.shape[-2:])}")
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand([patches.shape[0], 1, self.config.hidden_size])
        return paddle.concat([cls, patches], axis=1) + self.position_embeddings


class SelfAttention(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden, bias = config.hidden_size, None if config.qkv_bias else False
        self.heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden, bias_attr=bias)
        self.key = nn.Linear(hidden, hidden, bias_attr=bias)
        self.value = nn.Linear(hidden, hidden, bias_attr=bias)

    def forward(self, x):
        n, length, hidden = x.shape
        width = hidden // self.heads

        def split(t):
            return t.reshape([n, length, self.heads, width]).transpose([0, 2, 1, 3])

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = F.softmax(paddle.matmul(q, k, transpose_y=True) / float(np.sqrt(width)), axis=-1)
        return paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([n, length, hidden])


class Dense(nn.Layer):
    """ViTSelfOutput / ViTIntermediate / ViTOutput: one `dense` each."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.dense(x)


class Attention(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.output = Dense(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.output(self.attention(x))


class Block(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.attention = Attention(config)
        self.intermediate = Dense(hidden, config.intermediate_size)
        self.output = Dense(config.intermediate_size, hidden)
        self.layernorm_before = nn.LayerNorm(hidden, epsilon=eps)
        self.layernorm_after = nn.LayerNorm(hidden, epsilon=eps)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x)), approximate=False))


class Encoder(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.LayerList([Block(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


class DinoViT(nn.Layer):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)

    def forward(self, pixel_values):
        """The last hidden state [n, 1 + patches, hidden] (after the final layer norm)."""
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))

    def cls_features(self, pixel_values: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """The DINO embedding of each image: its CLS token in the last layer, as float64 [n, hidden]."""
        outputs = []
        with paddle.no_grad():
            for start in range(0, len(pixel_values), batch_size):
                batch = paddle.to_tensor(np.ascontiguousarray(pixel_values[start:start + batch_size]))
                outputs.append(self(batch)[:, 0].numpy().astype(np.float64))
        return np.concatenate(outputs) if outputs else np.zeros((0, self.config.hidden_size))


def build_vit(config: ViTConfig) -> DinoViT:
    with paddle.utils.unique_name.guard():
        model = DinoViT(config)
    model.eval()
    return model
