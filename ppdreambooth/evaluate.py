"""Subject and prompt fidelity of a trained model, as the DreamBooth paper measures them on DreamBench.

    python -m ppdreambooth.evaluate --model ./dream_outputs --instance_data_dir ./dog --class_name dog
    python -m ppdreambooth.evaluate --model runwayml/stable-diffusion-v1-5 --lora ./path-to-save-model \\
        --instance_data_dir ./dog --class_name dog --num_images 4 --out ./eval

The model generates `--num_images` images (seeds seed, seed+1, ...) for each prompt; the same prompts
and seeds go through the base model (a full fine-tune: `--base_model`, by default the one its model card
names; a LoRA: the same pipeline without adapters), so the numbers show what training changed:

- DINO:   mean cosine similarity of DINO ViT-S/16 embeddings (CLS token), over all generated x real pairs;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity between each generated image's CLIP embedding and its prompt's.

Prompts: the paper's 25 DreamBench templates for objects or for live subjects (`--prompt_set`; `{}` is
filled with `--identifier` and `--class_name`, e.g. "a sks dog in the jungle"), or `--prompts_file`.
Writes `metrics.json`, `grid.png` (the real photos on top, then per prompt the model's images and the
base model's), the images under `images/`, and prints a table with the paper's numbers beside yours.

`--world` scores a model trained in the toy world (`ppdreambooth.toyworld`) exactly instead: subject fidelity,
prompt fidelity, language drift and background leakage over the world's subject and class prompts:

    python -m ppdreambooth.evaluate --world --model ./demo_outputs/sks-cross --instance_data_dir ./photos
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ppdreambooth.data.images import ImageError
from ppdreambooth.errors import ConfigError
from ppdreambooth.evaluation.dino import DEFAULT_DINO_MODEL
from ppdreambooth.evaluation.fidelity import DEFAULT_CLIP_MODEL
from ppdreambooth.evaluation.report import format_table
from ppdreambooth.evaluation.world import format_world_table
from ppdreambooth.evaluation.runs import evaluate
from ppdreambooth.inference.sampling import SCHEDULERS
from ppdreambooth.runtime.exiting import exit_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppdreambooth.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="the trained pipeline folder, or the base model of --lora (or a LoRA output folder)")
    parser.add_argument("--lora", help="folder with paddle_lora_weights.safetensors to evaluate on --model")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--base_model", help="the base model to compare a full fine-tune with "
                                             "(default: the model card's base_model)")
    parser.add_argument("--no_base", action="store_true", help="skip the base model's images and numbers")
    parser.add_argument("--model_family", choices=["sd", "sdxl", "sd3"], default=None)
    parser.add_argument("--instance_data_dir", required=True, help="the real photos of the subject")
    parser.add_argument("--world", action="store_true",
                        help="score in the toy world (ppdreambooth.toyworld): subject fidelity, prompt fidelity, "
                             "language drift and background leakage, read exactly from the pixels, instead of "
                             "DINO/CLIP on DreamBench prompts (--class_name: a world shape, default cross)")
    parser.add_argument("--prompt_set", choices=["auto", "object", "live"], default="auto",
                        help="DreamBench's 25 prompts for objects or live subjects (auto: live for dog and cat)")
    parser.add_argument("--prompts_file", help="your own prompts, one a line; '{}' becomes 'identifier class'")
    parser.add_argument("--identifier", default="sks", help="the subject's unique identifier (default sks)")
    parser.add_argument("--class_name", help="the subject's class noun, e.g. dog")
    parser.add_argument("--num_prompts", type=int, default=None, help="use this many prompts, spread over the set")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt (the paper: 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="default: dpm (SD, SDXL), flow_euler (SD3)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP: hub id or local folder")
    parser.add_argument("--dino_model", default=DEFAULT_DINO_MODEL, help="DINO ViT-S/16: hub id or local folder")
    parser.add_argument("--grid_cell", type=int, default=256, help="height of an image in grid.png (at most)")
    parser.add_argument("--out", default=None, help="default: <model or lora folder>/evaluation, else ./evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.num_images, args.steps, args.grid_cell, args.num_prompts or 1) <= 0:
        parser.error("--num_images, --steps, --num_prompts and --grid_cell must be positive")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8")
    if args.out is None:
        target = args.lora or args.model
        args.out = os.path.join(target, "evaluation") if os.path.isdir(target) else "evaluation"
    try:
        results = evaluate(args)
    except (ConfigError, ImageError) as e:
        parser.error(str(e))
    if args.world:
        settings = results["settings"]
        print(format_world_table(results["metrics"], settings["num_images"], len(settings["prompts"])))
    else:
        print(format_table(results))
    print(f"metrics.json, grid.png and the images written to {args.out}")
    return 0


def cli() -> None:
    exit_process(main())


if __name__ == "__main__":
    cli()
