"""Runs in the PyTorch environment (torch + transformers from PyPI), never imports Paddle: the reference
for ppdreambooth's DINO ViT port and for loading PyTorch-layout CLIP weights into ppdiffusers' CLIP.

    python vit_client.py vit <out_dir> <inputs.npz> <outputs.npz>
    python vit_client.py clip <out_dir> <inputs.npz> <outputs.npz>

`vit`: builds a tiny transformers `ViTModel` (with its pooler, as published checkpoints may carry one)
with random weights, saves it with `save_pretrained` to `<out_dir>/safetensors` (model.safetensors, the
published layout) and its raw `state_dict()` to `<out_dir>/bin/pytorch_model.bin` (transformers 5's
in-memory names), and writes `last_hidden_state` for the inputs' `pixel_values`.
`clip`: builds a tiny random transformers `CLIPModel`, saves it to `<out_dir>`, and writes
`image_embeds` (get_image_features of `pixel_values`) and `text_embeds` (get_text_features of `input_ids`).
"""
import json
import os
import sys

import numpy as np
import torch


def randomise(model, seed=0):
    """Every parameter random (layer norms and biases included), so that a wrong mapping cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def features(output):
    """transformers 5 may return a model output from get_*_features; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def run_vit(out_dir, inputs_path, outputs_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=32, patch_size=8, layer_norm_eps=1e-6)
    model = ViTModel(config, add_pooling_layer=True)
    randomise(model)
    model.eval()
    model.save_pretrained(os.path.join(out_dir, "safetensors"))
    os.makedirs(os.path.join(out_dir, "bin"), exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "bin", "pytorch_model.bin"))
    with open(os.path.join(out_dir, "bin", "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    pixel_values = torch.from_numpy(np.load(inputs_path)["pixel_values"])
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values).last_hidden_state
    np.savez(outputs_path, last_hidden_state=hidden.numpy())


def run_clip(out_dir, inputs_path, outputs_path):
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                max_position_embeddings=77, bos_token_id=97, eos_token_id=98, pad_token_id=98)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    randomise(model, seed=1)
    model.eval()
    model.save_pretrained(out_dir)
    data = np.load(inputs_path)
    with torch.no_grad():
        image = features(model.get_image_features(pixel_values=torch.from_numpy(data["pixel_values"])))
        text_embeds = features(model.get_text_features(input_ids=torch.from_numpy(data["input_ids"])))
    np.savez(outputs_path, image_embeds=image.numpy(), text_embeds=text_embeds.numpy())


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"vit": run_vit, "clip": run_clip}[command](*args)
