"""Size of a rank-r UNet LoRA file for Stable Diffusion 1.5, computed from SD 1.5's UNet configuration.

    python benchmarks/lora_size.py [--rank 4] [--lora_type dora]

Computed, not measured: it counts rank * (in + out) for every adapted projection (to_q, to_k, to_v,
to_out.0 of each attention block), the same formula the test-suite checks against a real model.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdreambooth.modeling.lora import lora_parameter_count  # noqa: E402

# runwayml/stable-diffusion-v1-5 unet/config.json (the fields the count needs)
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_type", choices=["lora", "dora"], default="lora",
                        help="dora adds a magnitude per output feature of each adapted projection")
    args = parser.parse_args()
    params = lora_parameter_count(args.rank, SD15_UNET, dora=args.lora_type == "dora")
    print(f"SD 1.5 UNet {'DoRA' if args.lora_type == 'dora' else 'LoRA'}, rank {args.rank}: {params:,} parameters = "
          f"{params * 4 / 1e6:.2f} MB in float32 ({params * 4 / 2**20:.2f} MiB), plus a few kB of safetensors header")
