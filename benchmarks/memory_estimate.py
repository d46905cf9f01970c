"""Computed (not measured) GPU memory of parameters, gradients and optimizer state, from the real configs.

    python benchmarks/memory_estimate.py [--family sd15 sdxl]

The denoisers and text encoders of SD 1.5 and SDXL-base-1.0 are built from their published configurations
under `paddle.LazyGuard` (no weights are allocated, nothing is downloaded) and their parameters counted,
including, for LoRA, the exact adapted projections (to_q, to_k, to_v, to_out.0; rank * (in + out) each).
Per mode it adds up what the trained network costs on one device: weights, gradients and optimizer state
(AdamW: two float32 moments, plus a float32 master copy under fp16/bf16 O2; Adafactor: factored float32
second moments, rows + columns of every matrix; PaddleNLP sharding stage1 splits the optimizer state over
the devices, stage2 the gradients too). Text encoders are cached and released (the default), so they cost
nothing; the float32 VAE is added unless `--cache_latents` releases it too. Activations come on top: they
depend on resolution, kernels and attention implementation, and are what recompute and memory-efficient
attention cut — they are not estimated here.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppdreambooth  # noqa: F401,E402  (the peft backend switch before ppdiffusers)

GB = 1024**3
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# The published configurations (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0):
# only the fields that shape the parameters.
UNETS = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, projection_dim=1280)
TEXT_ENCODERS = {"sd15": [("CLIPTextModel", CLIP_L)],
                 "sdxl": [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", CLIP_BIG_G)]}

# What the anchors publish (README figures, not measured here)
ANCHORS = {"sdxl": ["diffusers: SDXL DreamBooth LoRA fits in < 16 GB (train_dreambooth_lora_sdxl README)",
                    "kohya sd-scripts: SDXL LoRA in about 8 GB; full SDXL fine-tuning in 24 GB with Adafactor"],
           "sd15": ["diffusers: full SD 1.x DreamBooth in 16 GB with gradient checkpointing + 8-bit Adam",
                    "the seed README: 24 GB with gradient checkpointing; a rank-4 LoRA file is about 3 MB"]}


def shapes(layer):
    return [tuple(p.shape) for p in layer.parameters()]


def clip_text_parameters(vocab_size, hidden_size, intermediate_size, num_hidden_layers, projection_dim=0,
                         num_attention_heads=None, positions=77) -> int:
    """A CLIP text transformer's parameter count (its weight initialisation cannot run under LazyGuard):
    embeddings, per layer q/k/v/out projections, two layer norms and the MLP, the final norm, the projection."""
    h, i = hidden_size, intermediate_size
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    return vocab_size * h + positions * h + num_hidden_layers * layer + 2 * h + h * projection_dim


def count_family(name: str) -> dict:
    """Parameter counts of a family's networks, and the numbers the optimizer states depend on."""
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel

    with paddle.LazyGuard(), paddle.utils.unique_name.guard():
        unet = UNet2DConditionModel(**UNETS[name])
        vae = AutoencoderKL(**VAE, sample_size=1024 if name == "sdxl" else 512)
    unet_shapes = shapes(unet)
    lora_in_out = [(sub.weight.shape[0] + sub.weight.shape[1]) for path, sub in unet.named_sublayers()
                   if path.endswith(LORA_TARGETS) and isinstance(sub, paddle.nn.Linear)]
    return {
        "unet": sum(int(np.prod(s)) for s in unet_shapes),
        # Adafactor keeps rows + columns for every matrix (last two dims), the full moment for vectors
        "unet_adafactor_state": sum(int(np.prod(s[:-1])) + int(np.prod(s[:-2])) * s[-1] if len(s) >= 2
                                    else int(np.prod(s)) for s in unet_shapes),
        "vae": sum(int(np.prod(s)) for s in shapes(vae)),
        "text_encoders": [clip_text_parameters(**cfg) for _, cfg in TEXT_ENCODERS[name]],
        "lora": {rank: rank * sum(lora_in_out) for rank in (4, 16)},
    }


def estimates(n: dict) -> list:
    """(mode, bytes of the trained network's weights + gradients + optimizer state) on one device."""
    unet, factored = n["unet"], n["unet_adafactor_state"]
    rows = [
        ("LoRA rank 4, fp32", unet * 4 + n["lora"][4] * 16),
        ("LoRA rank 4, fp16 O2", unet * 2 + n["lora"][4] * (2 + 2 + 4 + 8)),
        ("LoRA rank 16, fp16 O2", unet * 2 + n["lora"][16] * (2 + 2 + 4 + 8)),
        ("full, AdamW fp32", unet * (4 + 4 + 8)),
        ("full, AdamW fp16 O2", unet * (2 + 2 + 4 + 8)),  # + float32 master weights
        ("full, Adafactor fp32 (--optim adafactor)", unet * (4 + 4) + factored * 4),
        ("full, Adafactor bf16 O2 (--optim adafactor --bf16)", unet * (2 + 2 + 4) + factored * 4),
    ]
    for devices in (2, 4, 8):  # AdamW fp16 O2: master weights and moments are optimizer state
        rows.append((f"full, AdamW fp16 O2, --sharding stage1 on {devices} GPUs", unet * (2 + 2) + unet * 12 / devices))
        rows.append((f"full, AdamW fp16 O2, --sharding stage2 on {devices} GPUs", unet * 2 + unet * 14 / devices))
    return rows


def table(name: str, n: dict) -> str:
    vae = n["vae"] * 4
    lines = [f"{name}: denoiser {n['unet']:,} parameters, VAE {n['vae']:,}, text encoders "
             f"{' + '.join(f'{c:,}' for c in n['text_encoders'])}; UNet LoRA rank 4 {n['lora'][4]:,}, "
             f"rank 16 {n['lora'][16]:,}", "",
             "| mode | parameters + gradients + optimizer state (GiB) | + float32 VAE, no --cache_latents (GiB) |",
             "| --- | --- | --- |"]
    lines += [f"| {mode} | {b / GB:.2f} | {(b + vae) / GB:.2f} |" for mode, b in estimates(n)]
    lines += ["", "Published by the anchors (not measured here): " + "; ".join(ANCHORS[name]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=sorted(UNETS), default=sorted(UNETS))
    for family in parser.parse_args().family:
        print(table(family, count_family(family)) + "\n")
