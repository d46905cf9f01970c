"""DINO ViT-S/16 in Paddle: the subject-fidelity encoder of the DreamBooth paper's DINO metric.

Paddle and ppdiffusers have no DINO model, so this module holds the small Vision Transformer it needs
(the architecture of transformers' `ViTModel`: pre-norm blocks, exact GELU, a CLS token and learned
position embeddings) and loads the published weights of `facebook/dino-vits16` into it. Those weights
are in PyTorch's layout, with the key names transformers' `ViTModel` writes
(`embeddings.cls_token`, `encoder.layer.N.attention.attention.query.weight`, ...); transformers 5's
in-memory names (`layers.N.attention.q_proj.weight`, ...) and a `vit.` prefix are accepted too, a
pooler or classifier head is ignored. Linear weights are transposed to Paddle's [in, out].

    model, preprocess = load_dino("facebook/dino-vits16")   # or a local folder
    features = model.cls_features(preprocess(images))        # [n, 384], the metric's embedding

A DINO embedding is the CLS token of the last layer after the final layer norm, as DreamBench computes it.
`--dino_model` takes a local folder (config.json + model.safetensors or pytorch_model.bin, optionally
preprocessor_config.json) or a hub id, fetched with huggingface_hub's snapshot download.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ----- preprocessing (shared with the CLIP encoders of ppdreambooth.evaluate) -------------------------
@dataclass
class ImagePreprocess:
    """Resize (to a fixed size, or the shortest edge to `shortest_edge`), centre-crop, scale to [0, 1] and
    normalise, as transformers' image processors do. Built from a model's `preprocessor_config.json`."""

    size: Optional[Tuple[int, int]] = None  # (height, width): resize to exactly this
    shortest_edge: Optional[int] = None  # or: resize so that the shorter side is this long
    crop: Optional[Tuple[int, int]] = None  # (height, width) of the centre crop, if any
    resample: int = 2  # PIL code: 2 bilinear, 3 bicubic
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_config(cls, config: dict, defaults: "ImagePreprocess") -> "ImagePreprocess":
        """Read a transformers `preprocessor_config.json` dict; missing entries keep `defaults`."""
        out = ImagePreprocess(**{k: getattr(defaults, k) for k in defaults.__dataclass_fields__})
        if config.get("do_resize", True) and "size" in config:
            size = config["size"]
            if isinstance(size, int):  # ViTFeatureExtractor: both sides; CLIP's old configs: the shortest edge
                if config.get("do_center_crop") or "crop_size" in config:
                    out.size, out.shortest_edge = None, size
                else:
                    out.size, out.shortest_edge = (size, size), None
            elif "shortest_edge" in size:
                out.size, out.shortest_edge = None, int(size["shortest_edge"])
            else:
                out.size, out.shortest_edge = (int(size["height"]), int(size["width"])), None
        if "do_center_crop" in config and not config["do_center_crop"]:
            out.crop = None
        elif "crop_size" in config:
            crop = config["crop_size"]
            out.crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        if "resample" in config:
            out.resample = int(config["resample"])
        if config.get("do_normalize", True):
            out.mean = tuple(config.get("image_mean", out.mean))
            out.std = tuple(config.get("image_std", out.std))
        else:
            out.mean, out.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return out

    def __call__(self, images: Sequence) -> np.ndarray:
        """PIL images -> float32 array [n, 3, height, width]."""
        return np.stack([self.one(image) for image in images])

    def one(self, image) -> np.ndarray:
        image = image.convert("RGB")
        if self.size is not None:
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        elif self.shortest_edge is not None:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            new = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            image = image.resize(new, resample=self.resample)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if self.crop is not None:
            height, width = array.shape[:2]
            top, left = max((height - self.crop[0]) // 2, 0), max((width - self.crop[1]) // 2, 0)
            array = array[top:top + self.crop[0], left:left + self.crop[1]]
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return array.transpose(2, 0, 1).astype(np.float32)


# ----- the model ------------------------------------------------------------------------------------
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


def _build_model(config: ViTConfig):
    """The ViT as Paddle layers, with parameter names equal to the published checkpoint's keys."""
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F

    hidden, eps = config.hidden_size, config.layer_norm_eps

    class PatchEmbeddings(nn.Layer):
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2D(config.num_channels, hidden, config.patch_size, stride=config.patch_size)

        def forward(self, pixel_values):
            return self.projection(pixel_values).flatten(2).transpose([0, 2, 1])  # [n, patches, hidden]

    class Embeddings(nn.Layer):
        def __init__(self):
            super().__init__()
            normal = nn.initializer.TruncatedNormal(std=0.02)
            self.cls_token = self.create_parameter([1, 1, hidden], default_initializer=normal)
            self.position_embeddings = self.create_parameter([1, config.num_patches + 1, hidden],
                                                             default_initializer=normal)
            self.patch_embeddings = PatchEmbeddings()

        def forward(self, pixel_values):
            if tuple(pixel_values.shape[-2:]) != (config.image_size, config.image_size):
                raise ValueError(f"the ViT takes {config.image_size}x{config.image_size} images, got "
                                 f"{tuple(pixel_values.shape[-2:])}")
            patches = self.patch_embeddings(pixel_values)
            cls = self.cls_token.expand([patches.shape[0], 1, hidden])
            return paddle.concat([cls, patches], axis=1) + self.position_embeddings

    class SelfAttention(nn.Layer):
        def __init__(self):
            super().__init__()
            bias = None if config.qkv_bias else False
            self.query = nn.Linear(hidden, hidden, bias_attr=bias)
            self.key = nn.Linear(hidden, hidden, bias_attr=bias)
            self.value = nn.Linear(hidden, hidden, bias_attr=bias)

        def forward(self, x):
            n, length = x.shape[0], x.shape[1]
            heads, width = config.num_attention_heads, hidden // config.num_attention_heads

            def split(t):
                return t.reshape([n, length, heads, width]).transpose([0, 2, 1, 3])

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            weights = F.softmax(paddle.matmul(q, k, transpose_y=True) / float(np.sqrt(width)), axis=-1)
            return paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([n, length, hidden])

    class Dense(nn.Layer):  # ViTSelfOutput / ViTIntermediate / ViTOutput: one `dense` each
        def __init__(self, d_in, d_out):
            super().__init__()
            self.dense = nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.dense(x)

    class Attention(nn.Layer):
        def __init__(self):
            super().__init__()
            self.attention = SelfAttention()
            self.output = Dense(hidden, hidden)

        def forward(self, x):
            return self.output(self.attention(x))

    class Block(nn.Layer):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = Dense(hidden, config.intermediate_size)
            self.output = Dense(config.intermediate_size, hidden)
            self.layernorm_before = nn.LayerNorm(hidden, epsilon=eps)
            self.layernorm_after = nn.LayerNorm(hidden, epsilon=eps)

        def forward(self, x):
            x = x + self.attention(self.layernorm_before(x))
            return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x)), approximate=False))

    class Encoder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.layer = nn.LayerList([Block() for _ in range(config.num_hidden_layers)])

        def forward(self, x):
            for block in self.layer:
                x = block(x)
            return x

    class DinoViT(nn.Layer):
        def __init__(self):
            super().__init__()
            self.config = config
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.layernorm = nn.LayerNorm(hidden, epsilon=eps)

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
            return np.concatenate(outputs) if outputs else np.zeros((0, hidden))

    return DinoViT()


def build_vit(config: ViTConfig):
    import paddle

    with paddle.utils.unique_name.guard():
        model = _build_model(config)
    model.eval()
    return model


# ----- weights ---------------------------------------------------------------------------------------
# transformers 5's in-memory names -> the published checkpoint's names
_V5_NAMES = [
    (r"^layers\.", "encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
_IGNORED = ("pooler.", "classifier.", "head.")


def published_key(key: str) -> Optional[str]:
    """The checkpoint key a weight name stands for, or None for weights the metric does not use."""
    if key.startswith("vit."):
        key = key[len("vit."):]
    if key.startswith(_IGNORED) or "position_ids" in key:
        return None
    for pattern, replacement in _V5_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def read_torch_weights(folder: str) -> Dict[str, np.ndarray]:
    """The weights of a transformers folder, as numpy arrays: model.safetensors, else pytorch_model.bin
    (read without PyTorch, by paddlenlp's reader of its zip/pickle format)."""
    path = os.path.join(folder, WEIGHT_FILES[0])
    if os.path.isfile(path):
        from safetensors.numpy import load_file

        return load_file(path)
    path = os.path.join(folder, WEIGHT_FILES[1])
    if os.path.isfile(path):
        from paddlenlp.utils.serialization import load_torch

        return {k: np.asarray(v) for k, v in load_torch(path).items()}
    raise FileNotFoundError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")


def load_vit_weights(model, weights: Dict[str, np.ndarray]) -> None:
    """Put PyTorch-layout ViT weights into `model`; every parameter must be there, with its shape."""
    import paddle.nn as nn

    linear = {name + ".weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    expected = model.state_dict()
    state = {}
    for key, value in weights.items():
        name = published_key(key)
        if name is None:
            continue
        value = np.asarray(value, dtype=np.float32)
        if name in linear:
            value = value.T
        state[name] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the ViT weights lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"the ViT weights have tensors this ViT does not, e.g. {', '.join(unknown[:3])}")
    for name, value in state.items():
        if tuple(expected[name].shape) != value.shape:
            raise ValueError(f"{name}: shape {value.shape} in the file, {tuple(expected[name].shape)} in the model")
    model.set_state_dict(state)


def resolve_model_folder(name_or_path: str, patterns: Sequence[str]) -> str:
    """A local folder as is; a hub id through huggingface_hub's snapshot download (config, preprocessor
    config, and the safetensors weights, else the pickled ones)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    folder = snapshot_download(name_or_path, allow_patterns=[*patterns, WEIGHT_FILES[0]])
    if not os.path.isfile(os.path.join(folder, WEIGHT_FILES[0])):
        folder = snapshot_download(name_or_path, allow_patterns=[*patterns, WEIGHT_FILES[1]])
    return folder


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_dino(name_or_path: str = DEFAULT_DINO_MODEL):
    """(model, preprocess) for a DINO ViT folder or hub id."""
    folder = resolve_model_folder(name_or_path, ["config.json", "preprocessor_config.json"])
    config = ViTConfig.from_dict(read_json(os.path.join(folder, "config.json")))
    model = build_vit(config)
    load_vit_weights(model, read_torch_weights(folder))
    defaults = ImagePreprocess(size=(config.image_size, config.image_size), resample=2)
    preprocess = ImagePreprocess.from_config(read_json(os.path.join(folder, "preprocessor_config.json")), defaults)
    return model, preprocess


def write_tiny_dino(folder: str, seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden_size: int = 24,
                    layers: int = 2, heads: int = 4) -> str:
    """A tiny random ViT folder in the published layout (config.json, model.safetensors, preprocessor
    config), for tests and offline runs: no download."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config = ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden_size, image_size=image_size, patch_size=patch_size,
                       layer_norm_eps=1e-6)
    rng = np.random.RandomState(seed)
    h, p = hidden_size, patch_size

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"embeddings.cls_token": normal(1, 1, h),
               "embeddings.position_embeddings": normal(1, config.num_patches + 1, h),
               "embeddings.patch_embeddings.projection.weight": normal(h, 3, p, p, scale=0.05),
               "embeddings.patch_embeddings.projection.bias": normal(h), "layernorm.weight": 1 + normal(h),
               "layernorm.bias": normal(h)}
    shapes = {"attention.attention.query": (h, h), "attention.attention.key": (h, h),
              "attention.attention.value": (h, h), "attention.output.dense": (h, h),
              "intermediate.dense": (2 * h, h), "output.dense": (h, 2 * h)}
    for i in range(layers):
        for name, shape in shapes.items():  # PyTorch layout: [out, in]
            weights[f"encoder.layer.{i}.{name}.weight"] = normal(*shape)
            weights[f"encoder.layer.{i}.{name}.bias"] = normal(shape[0])
        for norm in ("layernorm_before", "layernorm_after"):
            weights[f"encoder.layer.{i}.{norm}.weight"] = 1 + normal(h)
            weights[f"encoder.layer.{i}.{norm}.bias"] = normal(h)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": h, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "intermediate_size": 2 * h, "hidden_act": "gelu",
                   "layer_norm_eps": config.layer_norm_eps, "image_size": image_size, "patch_size": p,
                   "num_channels": 3, "qkv_bias": True}, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_resize": True, "size": image_size, "resample": 2, "do_normalize": True,
                   "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}, f, indent=2)
    return folder


__all__: List[str] = ["DEFAULT_DINO_MODEL", "ImagePreprocess", "ViTConfig", "build_vit", "load_dino",
                      "load_vit_weights", "published_key", "read_torch_weights", "resolve_model_folder",
                      "write_tiny_dino"]
