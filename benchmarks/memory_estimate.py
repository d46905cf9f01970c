"""Computed (not measured) GPU memory for SD 1.5 DreamBooth at 512 px, batch 1, from the real configs.

    python benchmarks/memory_estimate.py

Parameter counts come from building SD 1.5's UNet, VAE and CLIP text encoder from their published
configurations with random weights (nothing is downloaded; it needs about 5 GB of RAM for a minute). Per mode it adds up
what parameters cost on the device: weights, gradients and AdamW state (two float32 moments, plus a
float32 master copy under O2). Activation memory comes on top; it depends on kernels and attention
implementation and is what recompute and memory-efficient attention cut — it is not estimated here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppdreambooth  # noqa: F401,E402

from benchmarks.lora_size import SD15_UNET  # noqa: E402
from ppdreambooth.lora import lora_parameter_count  # noqa: E402

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)
GB = 1024**3


def count_parameters() -> dict:
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    def numel(layer):
        return sum(int(p.numel()) for p in layer.parameters())

    with paddle.utils.unique_name.guard():
        unet = UNet2DConditionModel(**SD15_UNET, sample_size=64, attention_head_dim=8)
        vae = AutoencoderKL(**SD15_VAE, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return {"unet": numel(unet), "vae": numel(vae), "text_encoder": numel(text), "lora_r4": lora_parameter_count(4, SD15_UNET)}


def estimates(n: dict) -> list:
    """(mode, GiB by default, GiB with --cache_latents). By default the frozen text encoder is released
    once the prompt embeddings are cached, so only the float32 VAE stays; with --cache_latents neither."""
    vae = n["vae"] * 4
    modes = (
        ("full fine-tuning, fp32", n["unet"] * (4 + 4 + 8)),  # weights, grads, two AdamW moments
        ("full fine-tuning, fp16 O2", n["unet"] * (2 + 2 + 4 + 8)),  # + float32 master weights
        ("full fine-tuning + text encoder, fp32", (n["unet"] + n["text_encoder"]) * (4 + 4 + 8)),
        ("LoRA rank 4, fp32", n["unet"] * 4 + n["lora_r4"] * 16),
        ("LoRA rank 4, fp16 O2", n["unet"] * 2 + n["lora_r4"] * (2 + 2 + 4 + 8)),
    )
    return [(name, (trained + vae) / GB, trained / GB) for name, trained in modes]


if __name__ == "__main__":
    n = count_parameters()
    print(f"SD 1.5 parameters: UNet {n['unet']:,}, VAE {n['vae']:,}, text encoder {n['text_encoder']:,}, "
          f"UNet LoRA rank 4 {n['lora_r4']:,}")
    print("| mode | parameter memory (GiB) | with --cache_latents (GiB) |")
    print("| --- | --- | --- |")
    for name, plain, cached in estimates(n):
        print(f"| {name} | {plain:.2f} | {cached:.2f} |")
