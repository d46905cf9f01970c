"""Build a tiny, randomly initialised Stable Diffusion pipeline folder, with no download.

The demo (`bash run_train.sh` with no arguments) and the test-suite train this model. It has the
same component layout as `runwayml/stable-diffusion-v1-5` (vae/, text_encoder/, tokenizer/, unet/,
scheduler/, model_index.json) but a few hundred thousand parameters, so a training step takes well
under a second on a CPU. It is random: it shows the mechanics of DreamBooth, not image quality.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

# Byte-level BPE tokenizer alphabet (as CLIP's tokenizer maps bytes to printable characters).
_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def _byte_alphabet() -> list:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: str) -> int:
    """Write a character-level CLIP tokenizer (vocab.json + merges.txt); return its vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + _SPECIAL_TOKENS
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return len(tokens)


def build_tiny_pipeline(out_dir: str, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8):
    """Create a tiny StableDiffusionPipeline with seeded random weights and save it to `out_dir`.

    Returns the in-memory pipeline. `sample_size` is the latent size; images are 8x larger (64 px).
    """
    import paddle
    from ppdiffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        # Four blocks, like SD's VAE, so that images are downsampled by 8 as in the real model.
        vae = AutoencoderKL(
            block_out_channels=[16, 16, 32, 32],
            layers_per_block=1,
            norm_num_groups=8,
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            sample_size=sample_size * 8,
        )
        tmp = tempfile.mkdtemp()  # the tokenizer copies its files from here when the pipeline is saved
        vocab_size = write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=vocab_size,
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return pipe


def main(argv: Optional[list] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Stable Diffusion pipeline folder.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    args = parser.parse_args(argv)
    build_tiny_pipeline(args.out_dir, seed=args.seed, prediction_type=args.prediction_type)
    print(f"tiny pipeline written to {args.out_dir}")


if __name__ == "__main__":
    main()
