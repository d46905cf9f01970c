"""How far the toy-world recipe gets: the VAE's reconstruction rates per shape, then the UNet's held-out scores at
chosen steps, for one or more UNet widths trained on the same VAE latents.

    OMP_NUM_THREADS=1 python benchmarks/bench_toy_pretraining.py [--vae_steps 1200] [--unet_steps 6000]
        [--eval_at 2000,4000,6000] [--widths 32,64 48,96] [--prompts 48] [--guidance 4 7]

Uses the builder's own pieces (`ppdreambooth.toyworld.pretrain`'s data, VAE and denoiser recipes), so what it
prints is what a build with those settings would reach. Rates are shares of held-out prompts' images (one image
per prompt, DPM-Solver 25 steps) with the attribute right; the base bar is background >= 90%, class and colour >= 80%.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdreambooth.toyworld.assemble import build_pipeline  # noqa: E402
from ppdreambooth.toyworld.denoiser import (DenoiserRecipe, LatentSet, build_text_encoder, build_unet,  # noqa: E402
                                            parameter_count, short_caption_ids, token_ids, train_denoiser)
from ppdreambooth.toyworld.evaluate_base import generate_for_prompts, ready_for_sampling, rates_by_kind  # noqa: E402
from ppdreambooth.toyworld.pretraining_data import held_out_prompts, pretraining_set, render_scenes  # noqa: E402
from ppdreambooth.toyworld.scoring import read_image  # noqa: E402
from ppdreambooth.toyworld.tokenizer import build_world_tokenizer  # noqa: E402
from ppdreambooth.toyworld.vae import (VaeRecipe, build_vae, encode_posteriors, reconstruct,  # noqa: E402
                                       scaling_factor_from, subject_reconstruction_check, train_vae)
from ppdreambooth.toyworld.world import pretraining_scenes  # noqa: E402

KEYS = ("background_ok", "colour_ok", "pattern_ok", "class_ok")


def vae_class_rates(vae, seed: int, count: int = 400) -> dict:
    """Per (shape, pattern) of fresh scenes: the share whose reconstruction is read as the right shape."""
    scenes = pretraining_scenes(count, seed + 7)
    readings = [read_image(image)["shape"] for image in reconstruct(vae, render_scenes(scenes))]
    right, total = collections.Counter(), collections.Counter()
    for scene, shape in zip(scenes, readings):
        total[(scene.shape, scene.pattern)] += 1
        right[(scene.shape, scene.pattern)] += shape == scene.shape
    return {key: (right[key], total[key]) for key in sorted(total)}


def main() -> None:
    import paddle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--vae_steps", type=int, default=VaeRecipe().steps)
    parser.add_argument("--unet_steps", type=int, default=DenoiserRecipe().steps)
    parser.add_argument("--eval_at", default=None, help="comma-separated steps (default: a third, two thirds, end)")
    parser.add_argument("--widths", nargs="+", default=["32,64", "48,96"], help="UNet block widths to compare")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts, one image each")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0, 7.0])
    args = parser.parse_args()
    steps = args.unet_steps
    eval_at = {int(s) for s in args.eval_at.split(",")} if args.eval_at else {steps // 3, 2 * steps // 3, steps}

    held_out = held_out_prompts(96, args.seed)
    images, captions = pretraining_set(args.images, args.seed, held_out)
    paddle.seed(args.seed)
    started = time.time()
    vae_recipe = VaeRecipe(steps=args.vae_steps, warmup=min(VaeRecipe().warmup, max(1, args.vae_steps // 10)))
    vae = build_vae(vae_recipe)
    train_vae(vae, images, vae_recipe, args.seed, log=lambda m: None)
    print(f"VAE: {args.vae_steps} steps in {time.time() - started:.0f} s")
    print("subject photos reconstructed:", subject_reconstruction_check(vae))
    for (shape, pattern), (right, total) in vae_class_rates(vae, args.seed).items():
        print(f"  VAE class right, {shape} {pattern}: {right}/{total}")
    means, stds = encode_posteriors(vae, images)
    factor = scaling_factor_from(means)
    vae.register_to_config(scaling_factor=factor)

    prompts = held_out[:args.prompts]
    print(f"\n{len(prompts)} held-out prompts x 1 image; rates as background / colour / pattern / class")
    print("| UNet widths | parameters | steps | seconds (incl. scoring) | " + " | ".join(f"guidance {g:g}" for g in args.guidance) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(args.guidance))
    tokenizer = build_world_tokenizer(tempfile.mkdtemp())
    data = LatentSet(means * factor, stds * factor, token_ids(tokenizer, captions), token_ids(tokenizer, [""])[0],
                     short_caption_ids(tokenizer, captions))
    for widths in args.widths:
        recipe = replace(DenoiserRecipe(), widths=tuple(int(w) for w in widths.split(",")), steps=steps)
        paddle.seed(args.seed)
        text_encoder, unet = build_text_encoder(tokenizer, recipe), build_unet(recipe, latent_size=8)
        clock = time.time()

        def score(step: int) -> None:
            if step not in eval_at:
                return
            seconds = time.time() - clock
            text_encoder.eval(), unet.eval()
            pipeline = ready_for_sampling(build_pipeline(vae, text_encoder, tokenizer, unet))
            cells = []
            for guidance in args.guidance:
                generated, repeated = generate_for_prompts(pipeline, prompts, args.seed, 1, 25, guidance)
                rates = rates_by_kind(generated, repeated)["all prompts"]
                cells.append(" / ".join(f"{rates[key]:.0%}" for key in KEYS))
            print(f"| {widths} | {parameter_count(unet):,} | {step} | {seconds:.0f} | " + " | ".join(cells) + " |",
                  flush=True)
            text_encoder.train(), unet.train()

        train_denoiser(text_encoder, unet, data, recipe, args.seed, log=lambda m: None, after_step=score)


if __name__ == "__main__":
    main()
