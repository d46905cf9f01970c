"""Score a pretrained toy-world pipeline on held-out prompts with the world's exact pixel scorer.

The prompts are captions the pretraining set left out (`pretraining_data.held_out_prompts`), half plain and half
patterned. Images are generated as everywhere else in the project (`inference.sampling.generate_images`: seeded
NumPy starting latents, one image at a time), with a deterministic sampler, so the figures are reproducible.
Run on its own: `python -m ppdreambooth.toyworld.evaluate_base <pipeline folder> [--seed 0]`.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

import numpy as np

from ppdreambooth.inference.sampling import generate_images, prepare_for_sampling

from .pretraining_data import held_out_prompts
from .scoring import attribute_rates

DEFAULT_PROMPTS = 96
DEFAULT_IMAGES_PER_PROMPT = 2
RATE_NAMES = {"background_ok": "background colour", "class_ok": "object class", "colour_ok": "object colour(s)",
              "pattern_ok": "pattern", "all": "everything asked"}
BAR = {"background_ok": 0.90, "class_ok": 0.80, "colour_ok": 0.80}  # the base model's acceptance bar


def ready_for_sampling(pipeline, sampler: str = "dpm"):
    """The pipeline with a deterministic multistep sampler (a `SCHEDULERS` name) built from its own config."""
    return prepare_for_sampling(pipeline, None, sampler)


def image_seeds(seed: int, count: int) -> List[int]:
    """One seed per image, apart from the build seed's other streams."""
    return [10_000 * (seed + 1) + i for i in range(count)]


def generate_for_prompts(pipeline, prompts: Sequence[str], seed: int, images_per_prompt: int,
                         steps: int = 25, guidance: float = 4.0) -> tuple:
    """(uint8 images, their prompts): each prompt `images_per_prompt` times with its own seeded latents."""
    repeated = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    images = generate_images(pipeline, repeated, image_seeds(seed, len(repeated)), num_inference_steps=steps,
                             height=32, width=32, guidance_scale=guidance)
    return [np.asarray(image.convert("RGB")) for image in images], repeated


def rates_by_kind(images: Sequence[np.ndarray], prompts: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """`attribute_rates` over all images and separately over plain and patterned prompts."""
    kinds = {"all prompts": lambda p: True,
             "plain prompts": lambda p: "striped" not in p and "half" not in p,
             "patterned prompts": lambda p: "striped" in p or "half" in p}
    out = {}
    for kind, wanted in kinds.items():
        chosen = [i for i, prompt in enumerate(prompts) if wanted(prompt)]
        rates = attribute_rates([images[i] for i in chosen], [prompts[i] for i in chosen])
        out[kind] = dict(rates, images=len(chosen))
    return out


def evaluate_pipeline(pipeline, seed: int, n_prompts: int = DEFAULT_PROMPTS,
                      images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT, sampler: str = "dpm",
                      steps: int = 25, guidance: float = 4.0) -> Dict[str, object]:
    """Generate and score; returns the settings, the rates by prompt kind, and whether the bar is met."""
    ready_for_sampling(pipeline, sampler)
    prompts = held_out_prompts(n_prompts, seed)
    images, repeated = generate_for_prompts(pipeline, prompts, seed, images_per_prompt, steps, guidance)
    rates = rates_by_kind(images, repeated)
    overall = rates["all prompts"]
    return {
        "sampler": sampler, "steps": steps, "guidance": guidance, "size": 32, "prompts": len(prompts),
        "images_per_prompt": images_per_prompt, "rates": rates,
        "bar_met": all(overall[key] >= level for key, level in BAR.items()),
        "example_prompts": list(prompts[:6]),
    }


def rates_table(result: Dict[str, object]) -> str:
    """A markdown table: one row per attribute, one column per prompt kind (rate and image count)."""
    rates = result["rates"]
    kinds = list(rates)
    lines = ["| attribute | " + " | ".join(f"{k} ({rates[k]['images']} images)" for k in kinds) + " |",
             "| --- |" + " --- |" * len(kinds)]
    for key, name in RATE_NAMES.items():
        cells = []
        for kind in kinds:
            value, count = rates[kind][key], rates[kind]["images"]
            cells.append("n/a" if value != value else f"{value:.1%} ({round(value * count)}/{count})")
        bar = f" (bar {BAR[key]:.0%})" if key in BAR else ""
        lines.append(f"| {name}{bar} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    from ppdiffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description="Score a toy-world pipeline on held-out prompts.")
    parser.add_argument("model")
    parser.add_argument("--seed", type=int, default=0, help="the build seed (selects the held-out prompts)")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    parser.add_argument("--images_per_prompt", type=int, default=DEFAULT_IMAGES_PER_PROMPT)
    parser.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    pipeline = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    result = evaluate_pipeline(pipeline, args.seed, args.prompts, args.images_per_prompt, args.sampler, args.steps,
                               args.guidance)
    print(rates_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rates"}))


if __name__ == "__main__":
    main()
