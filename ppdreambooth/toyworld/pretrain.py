"""Build the pretrained toy-world SD 1.x model: `python -m ppdreambooth.toyworld.pretrain --out <folder>`.

Renders the pretraining set, trains the VAE, checks that it reconstructs the subject's stripes, trains the text
encoder and UNet on its latents, saves an ordinary `StableDiffusionPipeline` folder with a model card, and scores
the result on held-out prompts. Step counts are fixed by the recipes (`BuildPlan`), never by the clock, and every
random draw comes from the seed, so one command gives the same weights: run it as the model card says,
`OMP_NUM_THREADS=1 python -m ppdreambooth.toyworld.pretrain --out <folder>` (one thread: a multi-threaded CPU kernel
may sum in another order). About 22 minutes on one core of a 2-core machine, by the phases' measured times (VAE
1,200 steps about 4.5 minutes, UNet 6,000 steps about 15); no full build with these defaults has been timed yet.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np

from .assemble import build_pipeline, weight_digests
from .denoiser import (DenoiserRecipe, LatentSet, build_text_encoder, build_unet, parameter_count,
                       short_caption_ids, token_ids, train_denoiser)
from .evaluate_base import evaluate_pipeline, rates_table
from .model_card import write_card
from .pretraining_data import held_out_prompts, pretraining_set
from .tokenizer import IDENTIFIER, build_world_tokenizer, single_token_words
from .vae import (VaeRecipe, build_vae, describe_vae, encode_posteriors, reconstruction_rates, scaling_factor_from,
                  subject_reconstruction_check, train_vae)


@dataclass(frozen=True)
class BuildPlan:
    images: int = 12000
    vae: VaeRecipe = VaeRecipe()
    denoiser: DenoiserRecipe = DenoiserRecipe()
    eval_prompts: int = 96
    eval_images_per_prompt: int = 2


def plan_for(images: int = 12000, eval_prompts: int = 96, eval_images_per_prompt: int = 2,
             vae_steps: Optional[int] = None, unet_steps: Optional[int] = None,
             short_caption_share: float = 0.0) -> BuildPlan:
    """The recipes' defaults, with explicit step counts where given (warm-ups capped at a tenth of the steps)."""
    vae = replace(VaeRecipe(), steps=vae_steps or VaeRecipe().steps)
    denoiser = replace(DenoiserRecipe(), steps=unet_steps or DenoiserRecipe().steps,
                       short_caption_share=short_caption_share)
    vae = replace(vae, warmup=min(vae.warmup, max(1, vae.steps // 10)))
    denoiser = replace(denoiser, warmup=min(denoiser.warmup, max(1, denoiser.steps // 10)))
    return BuildPlan(images, vae, denoiser, eval_prompts, eval_images_per_prompt)


def token_embeddings(text_encoder) -> np.ndarray:
    return text_encoder.get_input_embeddings().weight.numpy().copy()


def unseen_token_ids(tokenizer, captions: List[str]) -> List[int]:
    """Ids of world words (and the identifier) that no pretraining caption uses; `sks` must be among them."""
    used = set(np.unique(token_ids(tokenizer, captions + [""])).tolist())
    return [tokenizer.convert_tokens_to_ids(word + "</w>") for word in single_token_words(tokenizer)
            if tokenizer.convert_tokens_to_ids(word + "</w>") not in used]


def recipe_text(plan: BuildPlan, scaling_factor: float) -> Dict[str, str]:
    v, d = plan.vae, plan.denoiser
    return {
        "data": f"{plan.images:,} renders of `pretraining_scenes(n, seed)` (half plain, a quarter striped, a quarter "
                "halves; never the subject), minus the held-out captions; captions from `Scene.caption()`",
        "tokenizer": "CLIP BPE over the byte alphabet plus one merge chain per world word and `sks` "
                     "(each one token), `model_max_length` 16",
        "VAE": f"AutoencoderKL, 3 blocks {v.widths}, layers_per_block {v.layers_per_block}, 4 latent channels "
               f"(8x8 latents); {v.steps} steps, batch {v.batch_size}, AdamW {v.lr} (warm-up {v.warmup}, cosine "
               f"to 0), clip 1, loss MSE + {v.kl_weight} x KL per latent element; scaling_factor "
               f"{scaling_factor:.4f} (1 / std of the latent means)",
        "text encoder": f"CLIPTextModel, hidden {d.text_width}, {d.text_layers} layers, {d.text_heads} heads, 16 "
                        "positions; trained jointly with the UNet",
        "UNet": f"UNet2DConditionModel {d.widths}, layers_per_block {d.layers_per_block}, cross-attention at "
                f"levels {d.cross_attention_levels}, head dim {d.attention_head_dim}; DDPM epsilon (SD's "
                f"scaled-linear 1,000 steps), {d.steps} steps, batch {d.batch_size}, AdamW {d.lr} (warm-up "
                f"{d.warmup}, cosine to 0), clip 1, Min-SNR gamma {d.min_snr_gamma}, "
                f"{d.empty_caption_share:.0%} empty captions (classifier-free guidance)"
                + (f", {d.short_caption_share:.0%} of captions shortened to the class, the object or the class in "
                   "its setting (`world.short_captions`)" if d.short_caption_share else ""),
    }


def build(out: str, seed: int, plan: BuildPlan, command: str, log=print) -> Dict[str, object]:
    """Run every phase and write the pipeline folder with its card; returns the build record."""
    import paddle

    seconds: Dict[str, float] = {}
    start = clock = time.time()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = time.time() - clock
        clock = time.time()
        log(f"[{phase}] {seconds[phase]:.0f} s")

    held_out = held_out_prompts(plan.eval_prompts, seed)
    images, captions = pretraining_set(plan.images, seed, held_out)
    lap("render")
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        vae = build_vae(plan.vae)
        train_vae(vae, images, plan.vae, seed, log)
        lap("vae training")
        subject_check = subject_reconstruction_check(vae)
        log(f"subject reconstruction: {subject_check}")
        recon = reconstruction_rates(vae, *pretraining_set(256, seed + 1))
        means, stds = encode_posteriors(vae, images)
        scaling_factor = scaling_factor_from(means)
        vae.register_to_config(scaling_factor=scaling_factor)
        lap("vae check and encoding")
        tokenizer_dir = tempfile.mkdtemp()
        tokenizer = build_world_tokenizer(tokenizer_dir)
        text_encoder = build_text_encoder(tokenizer, plan.denoiser)
        unet = build_unet(plan.denoiser, latent_size=images.shape[1] // 4)
    unseen = unseen_token_ids(tokenizer, captions)
    assert tokenizer.convert_tokens_to_ids(IDENTIFIER + "</w>") in unseen, "the identifier appeared in a caption"
    before = token_embeddings(text_encoder)[unseen]
    data = LatentSet(means * scaling_factor, stds * scaling_factor, token_ids(tokenizer, captions),
                     token_ids(tokenizer, [""])[0], short_caption_ids(tokenizer, captions))
    train_denoiser(text_encoder, unet, data, plan.denoiser, seed, log)
    unchanged = bool(np.array_equal(before, token_embeddings(text_encoder)[unseen]))
    lap("text encoder + unet training")
    pipeline = build_pipeline(vae, text_encoder, tokenizer, unet)
    if os.path.isdir(out):
        shutil.rmtree(out)
    pipeline.save_pretrained(out)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    lap("save")
    evaluation = evaluate_pipeline(pipeline, seed, plan.eval_prompts, plan.eval_images_per_prompt)
    lap("held-out evaluation")
    log(rates_table(evaluation))
    info = {
        "command": command, "seed": seed, "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "seconds": seconds, "total_seconds": time.time() - start, "plan": asdict(plan),
        "recipe": recipe_text(plan, scaling_factor), "scaling_factor": scaling_factor,
        "parameters": {"vae": parameter_count(vae), "text_encoder": parameter_count(text_encoder),
                       "unet": parameter_count(unet)},
        "untrained_tokens_unchanged": f"{len(unseen)} unused world tokens incl. `{IDENTIFIER}`, "
                                      f"{'unchanged' if unchanged else 'CHANGED'}",
        "subject_check": subject_check, "reconstruction_rates": recon, "reconstruction_images": 256,
        "evaluation": evaluation, "digests": weight_digests(out),
    }
    info["parameters"]["total"] = sum(info["parameters"].values())
    log(describe_vae(vae, plan.vae, scaling_factor))
    write_card(out, info)
    return info


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build the pretrained toy-world SD 1.x pipeline folder.")
    parser.add_argument("--out", required=True, help="pipeline folder to write (replaced if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=12000, help="pretraining renders")
    parser.add_argument("--vae_steps", type=int, default=None, help=f"default {VaeRecipe().steps}")
    parser.add_argument("--unet_steps", type=int, default=None, help=f"default {DenoiserRecipe().steps}")
    parser.add_argument("--short_caption_share", type=float, default=0.0,
                        help="share of captions shortened to the class, the object or the class in its setting "
                             "(default 0, the shipped model's recipe)")
    parser.add_argument("--eval_prompts", type=int, default=96)
    parser.add_argument("--eval_images_per_prompt", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("images", "vae_steps", "unet_steps", "eval_prompts", "eval_images_per_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not 0.0 <= args.short_caption_share < 1.0:
        parser.error(f"--short_caption_share must be in [0, 1), not {args.short_caption_share}")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m ppdreambooth.toyworld.pretrain " + " ".join(shlex.quote(a) for a in argv)
    plan = plan_for(args.images, args.eval_prompts, args.eval_images_per_prompt, args.vae_steps, args.unet_steps,
                    args.short_caption_share)
    print(f"plan: {plan.vae.steps} VAE steps, {plan.denoiser.steps} UNet steps, {plan.images} images, "
          f"{plan.eval_prompts} x {plan.eval_images_per_prompt} evaluation images", flush=True)
    build(args.out, args.seed, plan, command, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
