"""Computed (not measured) GPU memory of parameters, gradients and optimizer state, from the real configs.

    python benchmarks/memory_estimate.py [--family sd15 sdxl sd3]

The denoisers of SD 1.5, SDXL-base-1.0 and SD3-medium are built from their published configurations
under `paddle.LazyGuard` (no weights are allocated, nothing is downloaded) and their parameters counted,
including, for LoRA, the exact adapted projections (to_q, to_k, to_v, to_out.0; rank * (in + out) each).
Per mode it adds up what the trained network costs on one device: weights, gradients and optimizer state
(AdamW: two float32 moments, plus a float32 master copy under fp16/bf16 O2; Adafactor: factored float32
second moments, rows + columns of every matrix; PaddleNLP sharding stage1 splits the optimizer state over
the devices, stage2 the gradients too). Text encoders are cached and released (the default), so they cost
nothing; the float32 VAE is added unless `--cache_latents` releases it too, and a last column shows what
keeping the text encoders resident in fp16 would add (SD3's T5-XXL alone is 8.9 GiB). Activations come on top: they
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
VAE = dict(in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# The published configurations (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0):
# only the fields that shape the parameters.
DENOISERS = {
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
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
}
DENOISER_CLASSES = {"sd15": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel"}
LORA_TARGETS = {"sd15": ("to_q", "to_k", "to_v", "to_out.0"), "sdxl": ("to_q", "to_k", "to_v", "to_out.0"),
                "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, projection_dim=1280)
CLIP_L_PROJECTED = dict(CLIP_L, projection_dim=768)
TEXT_ENCODERS = {"sd15": [("CLIPTextModel", CLIP_L)],
                 "sdxl": [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", CLIP_BIG_G)],
                 "sd3": [("CLIPTextModelWithProjection", CLIP_L_PROJECTED), ("CLIPTextModelWithProjection", CLIP_BIG_G)]}
# T5 v1.1 XXL's encoder (SD3's text_encoder_3): gated-GELU feed-forward, no biases, relative position buckets
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, buckets=32)

# What the anchors publish (README figures, not measured here)
ANCHORS = {"sdxl": ["diffusers: SDXL DreamBooth LoRA fits in < 16 GB (train_dreambooth_lora_sdxl README)",
                    "kohya sd-scripts: SDXL LoRA in about 8 GB; full SDXL fine-tuning in 24 GB with Adafactor"],
           "sd15": ["diffusers: full SD 1.x DreamBooth in 16 GB with gradient checkpointing + 8-bit Adam",
                    "the seed README: 24 GB with gradient checkpointing; a rank-4 LoRA file is about 3 MB"],
           "sd3": ["PaddleMIX README_sd3: 47,000 MiB for LoRA at 512 px and 67,000 MiB for full fine-tuning at 1024 px "
                   "(fp16, T5 resident, activations included)"]}


def shapes(layer):
    return [tuple(p.shape) for p in layer.parameters()]


def clip_text_parameters(vocab_size, hidden_size, intermediate_size, num_hidden_layers, projection_dim=0,
                         num_attention_heads=None, positions=77) -> int:
    """A CLIP text transformer's parameter count (its weight initialisation cannot run under LazyGuard):
    embeddings, per layer q/k/v/out projections, two layer norms and the MLP, the final norm, the projection."""
    h, i = hidden_size, intermediate_size
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    return vocab_size * h + positions * h + num_hidden_layers * layer + 2 * h + h * projection_dim


def t5_encoder_parameters(vocab_size, d_model, d_kv, num_heads, d_ff, num_layers, buckets) -> int:
    inner = d_kv * num_heads
    layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model  # q, k, v, o; wi_0, wi_1, wo; two norms
    return vocab_size * d_model + num_layers * layer + buckets * num_heads + d_model


def count_family(name: str) -> dict:
    """Parameter counts of a family's networks, and the numbers the optimizer states depend on."""
    import paddle
    import ppdiffusers

    with paddle.LazyGuard(), paddle.utils.unique_name.guard():
        unet = getattr(ppdiffusers, DENOISER_CLASSES[name])(**DENOISERS[name])
        vae = ppdiffusers.AutoencoderKL(**VAE, latent_channels=16 if name == "sd3" else 4,
                                        sample_size=512 if name == "sd15" else 1024)
    unet_shapes = shapes(unet)
    lora_in_out = [(sub.weight.shape[0] + sub.weight.shape[1]) for path, sub in unet.named_sublayers()
                   if path.endswith(LORA_TARGETS[name]) and isinstance(sub, paddle.nn.Linear)]
    return {
        "unet": sum(int(np.prod(s)) for s in unet_shapes),
        # Adafactor keeps rows + columns for every matrix (last two dims), the full moment for vectors
        "unet_adafactor_state": sum(int(np.prod(s[:-1])) + int(np.prod(s[:-2])) * s[-1] if len(s) >= 2
                                    else int(np.prod(s)) for s in unet_shapes),
        "vae": sum(int(np.prod(s)) for s in shapes(vae)),
        "text_encoders": [clip_text_parameters(**cfg) for _, cfg in TEXT_ENCODERS[name]]
        + ([t5_encoder_parameters(**T5_XXL)] if name == "sd3" else []),
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
    vae, encoders = n["vae"] * 4, sum(n["text_encoders"]) * 2
    lines = [f"{name}: denoiser {n['unet']:,} parameters, VAE {n['vae']:,}, text encoders "
             f"{' + '.join(f'{c:,}' for c in n['text_encoders'])}; denoiser LoRA rank 4 {n['lora'][4]:,}, "
             f"rank 16 {n['lora'][16]:,}", "",
             "| mode | parameters + gradients + optimizer state (GiB) | + float32 VAE, no --cache_latents (GiB) "
             "| + text encoders kept resident in fp16 (GiB) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {mode} | {b / GB:.2f} | {(b + vae) / GB:.2f} | {(b + vae + encoders) / GB:.2f} |"
              for mode, b in estimates(n)]
    lines += ["", "Published by the anchors (not measured here): " + "; ".join(ANCHORS[name]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(DENOISERS), default=list(DENOISERS))
    for family in parser.parse_args().family:
        print(table(family, count_family(family)) + "\n")
