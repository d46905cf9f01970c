"""Generate images from a trained model (or a base model plus LoRA adapters).

    python -m ppdreambooth.generate --model ./dream_outputs --prompt "a photo of sks dog in a bucket"
    python -m ppdreambooth.generate --model runwayml/stable-diffusion-v1-5 --lora ./lora_out --lora_scale 0.8 \\
        --prompts_file prompts.txt --num_images 4 --seed 0 --out ./samples

Writes one PNG per image (`<index>-<prompt slug>-seed<seed>.png`) and a grid `grid.png` into `--out`.
A run trained with pivotal tuning (`*_emb.safetensors` in the --lora or --model folder) has its new tokens
loaded with `load_textual_inversion`, and its --token_abstraction in the prompts is written as those tokens.
Images depend only on prompt, seed, steps, guidance and scheduler (DPM-Solver by default, 25 steps; SD3: its
flow-matching Euler), ancestral ones (euler_a) included: each image's starting noise and per-step noise are
drawn from its own seed.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import List, Optional, Sequence

from ppdreambooth.errors import ConfigError
from ppdreambooth.inference.sampling import SCHEDULERS, generate_images, sampling_pipeline
from ppdreambooth.interop.merge import load_adapters
from ppdreambooth.modeling.pivotal import load_if_present
from ppdreambooth.runtime.exiting import exit_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppdreambooth.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or hub id (a training output_dir works)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompts_file", help="a text file with one prompt per line")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="default: dpm (SD, SDXL), flow_euler (SD3)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--lora", help="folder with paddle_lora_weights.safetensors to load into the model (DoRA "
                                       "adapters, which ppdiffusers cannot load, are folded into its weights)")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="LoRA: the adapters' scale; DoRA: how much of each weight's change is applied")
    parser.add_argument("--out", default="samples")
    return parser


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:limit].lower() or "prompt"


def make_grid(images: list, columns: int):
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def generate(args) -> List[str]:
    from tqdm.auto import tqdm

    prompts = read_prompts(args)
    family, pipe = sampling_pipeline(args.model, scheduler=args.scheduler)
    options = load_adapters(family, pipe, args.lora, args.lora_scale) if args.lora else {}
    pivotal = load_if_present(family, pipe, args.lora, args.model)  # pivotal tuning's new tokens, if any
    if pivotal is not None:
        prompts = [pivotal.apply(prompt) for prompt in prompts]
        print(f"loaded the new tokens {pivotal.replacement}: {pivotal.token_abstraction!r} in the prompts means them")
    os.makedirs(args.out, exist_ok=True)
    seeds = [args.seed + i for i in range(args.num_images)]
    paths, images = [], []
    with tqdm(total=len(prompts) * args.num_images, desc="images") as progress:
        for p, prompt in enumerate(prompts):
            group = generate_images(pipe, [prompt] * len(seeds), seeds, args.steps, args.height, args.width,
                                    args.guidance_scale, args.negative_prompt, options, progress=progress)
            for i, (seed, image) in enumerate(zip(seeds, group)):
                paths.append(os.path.join(args.out, f"{p:02d}-{i:02d}-{slug(prompt)}-seed{seed}.png"))
                image.save(paths[-1])
            images += group
    make_grid(images, columns=args.num_images).save(os.path.join(args.out, "grid.png"))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not read_prompts(args):
        parser.error("give at least one --prompt or a --prompts_file")
    if args.num_images <= 0 or args.steps <= 0:
        parser.error("--num_images and --steps must be positive")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8")
    try:
        paths = generate(args)
    except ConfigError as e:
        parser.error(str(e))
    print(f"{len(paths)} images and grid.png written to {args.out}")
    return 0


def cli() -> None:
    exit_process(main())


if __name__ == "__main__":
    cli()
