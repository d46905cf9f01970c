"""Tiny random scoring models (CLIP, DINO ViT) written as model folders in the published layouts: no download."""
import json
import os

import numpy as np

from ppdreambooth.evaluation.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ppdreambooth.evaluation.vit import ViTConfig


def write_tiny_clip(folder: str, seed: int = 0, image_size: int = 32) -> str:
    """A tiny random CLIP folder (Paddle weights, character-level tokenizer): for tests, no download."""
    import paddle
    from ppdiffusers.transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from ppdreambooth.families.tiny import write_tiny_tokenizer

    os.makedirs(folder, exist_ok=True)
    vocab_size = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=77)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
