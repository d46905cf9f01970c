"""Build a tiny, randomly initialised Stable Diffusion (1.x or XL) pipeline folder, with no download.

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


def byte_alphabet() -> list:
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
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + _SPECIAL_TOKENS
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return len(tokens)


def _tiny_text_encoder(tokenizer, vocab_size: int, with_projection: bool = False):
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab_size,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_unet(sample_size: int, sdxl: bool):
    from ppdiffusers import UNet2DConditionModel

    common = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    # SDXL's conditioning: cross attention over both encoders (32 + 32 channels), and an added embedding of
    # the pooled text (32) plus six size numbers (6 x 8): 80 inputs.
    return UNet2DConditionModel(
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, norm_num_groups=1, **common,
    )


def write_tiny_t5_tokenizer(folder: str) -> str:
    """Train a 32-piece sentencepiece model (a second, no download) for T5's tokenizer; returns its path."""
    import sentencepiece

    os.makedirs(folder, exist_ok=True)
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        for subject in ("dog", "cat", "toy", "bucket", "photo", "sks", "zwx", "sofa", "beach", "drawing"):
            f.write(f"a photo of sks {subject} in a bucket on a sofa at the beach, a drawing of {subject}\n")
    prefix = os.path.join(folder, "spiece")
    sentencepiece.SentencePieceTrainer.train(input=text, model_prefix=prefix, vocab_size=32, model_type="unigram",
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return prefix + ".model"


def _tiny_sd3_parts(sample_size: int, tmp: str, tokenizer, vocab_size: int, with_t5: bool) -> dict:
    """SD3's transformer, 16-channel VAE (with a shift factor) and text encoders, tiny. Identities:
    caption projection = heads x head width; pooled width = both CLIP projections; joint width = T5's d_model."""
    from ppdiffusers import AutoencoderKL, SD3Transformer2DModel
    from ppdiffusers.transformers import T5Config, T5EncoderModel, T5Tokenizer

    parts = {
        "transformer": SD3Transformer2DModel(
            sample_size=sample_size * 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
            pooled_projection_dim=64, pos_embed_max_size=32),
        "vae": AutoencoderKL(
            block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16,
            sample_size=sample_size * 8, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False),
        "text_encoder": _tiny_text_encoder(tokenizer, vocab_size, with_projection=True),
        "text_encoder_2": _tiny_text_encoder(tokenizer, vocab_size, with_projection=True),
        "tokenizer": tokenizer, "tokenizer_2": tokenizer, "text_encoder_3": None, "tokenizer_3": None,
    }
    if with_t5:
        t5_tokenizer = T5Tokenizer(write_tiny_t5_tokenizer(os.path.join(tmp, "t5")), extra_ids=0,
                                   model_max_length=77)
        parts["tokenizer_3"] = t5_tokenizer
        parts["text_encoder_3"] = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return parts


def build_tiny_pipeline(out_dir: str, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8,
                        family: str = "sd", with_t5: bool = True):
    """Create a tiny pipeline of `family` ("sd", "sdxl" or "sd3") with seeded random weights and save it to
    `out_dir`. Returns the in-memory pipeline. `sample_size` is the latent size; images are 8x larger (64 px).
    SD3 comes with a tiny T5 unless `with_t5` is False (then the folder has no text_encoder_3/tokenizer_3).
    """
    import paddle
    from ppdiffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                             StableDiffusionXLPipeline)
    from ppdiffusers.transformers import CLIPTokenizer

    if family not in ("sd", "sdxl", "sd3"):
        raise ValueError(f"no tiny model for family {family!r}")
    sdxl = family == "sdxl"
    paddle.seed(seed)
    if family == "sd3":
        from ppdiffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tmp = tempfile.mkdtemp()
        with paddle.utils.unique_name.guard():
            vocab_size = write_tiny_tokenizer(tmp)
            tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                      model_max_length=77)
            parts = _tiny_sd3_parts(sample_size, tmp, tokenizer, vocab_size, with_t5)
        pipe = StableDiffusion3Pipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        pipe.save_pretrained(out_dir)
        if not with_t5:  # record the absent encoder as the hub's SD3 folders without T5 do
            index_path = os.path.join(out_dir, "model_index.json")
            with open(index_path) as f:
                index = json.load(f)
            index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        shutil.rmtree(tmp, ignore_errors=True)
        return pipe
    with paddle.utils.unique_name.guard():
        unet = _tiny_unet(sample_size, sdxl)
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
            scaling_factor=0.13025 if sdxl else 0.18215,
        )
        tmp = tempfile.mkdtemp()  # the tokenizer copies its files from here when the pipeline is saved
        vocab_size = write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)
        text_encoder = _tiny_text_encoder(tokenizer, vocab_size)
        text_encoder_2 = _tiny_text_encoder(tokenizer, vocab_size, with_projection=True) if sdxl else None
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type=prediction_type)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**schedule), add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDPMScheduler(clip_sample=False, **schedule), safety_checker=None, feature_extractor=None,
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
    parser.add_argument("--family", choices=["sd", "sdxl", "sd3"], default="sd")
    args = parser.parse_args(argv)
    build_tiny_pipeline(args.out_dir, seed=args.seed, prediction_type=args.prediction_type, family=args.family)
    print(f"tiny pipeline written to {args.out_dir}")


if __name__ == "__main__":
    main()
