"""What a toy-world model draws for a bare class prompt (DreamBooth's class prompt, e.g. "a cross"): the shapes and
patterns the world's scorer reads from each image. Prior preservation trains on exactly such images.

    python benchmarks/class_prompt_draws.py [--prompt "a cross"] [--images 32] MODEL [MODEL ...]

Defaults to the shipped toy model. DPM-Solver 25 steps, guidance 4, generator seed 0 (the same images each run).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdreambooth.demo import TOY_MODEL  # noqa: E402


def draws(model: str, prompt: str, images: int) -> collections.Counter:
    """(shape, pattern) -> count over `images` samples of `prompt`."""
    import numpy as np
    import paddle
    from ppdiffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ppdreambooth.toyworld.scoring import read_image

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    arrays = pipe([prompt] * images, num_inference_steps=25, guidance_scale=4, height=32, width=32,
                  generator=paddle.Generator().manual_seed(0), output_type="np").images
    readings = [read_image((a * 255).round().astype(np.uint8)) for a in arrays]
    return collections.Counter((r["shape"], r["pattern"]) for r in readings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[TOY_MODEL])
    parser.add_argument("--prompt", default="a cross")
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    for model in args.models:
        counts = draws(model, args.prompt, args.images)
        shown = ", ".join(f"{shape} {pattern}: {n}" for (shape, pattern), n in counts.most_common())
        print(f"{model}: {args.images} images of {args.prompt!r}: {shown}", flush=True)


if __name__ == "__main__":
    main()
