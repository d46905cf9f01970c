"""Prior preservation with 200 class images vs without any (`--prior_preservation_mode base_prediction`).

    python benchmarks/bench_prior_modes.py [--class_images 200] [--steps 20]

LoRA on the tiny SD model at 64 px, batch 1, each mode in a fresh process (the training worker of
`bench_training.py`): the time from launch to the first training step (class-image generation with
DPM-Solver, 25 steps, batch 4, is part of it in the classic mode) and the steps per second afterwards
(the base-prediction mode runs the denoiser once more per step, without gradients, for the prior target).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_training import make_assets, spawn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class_images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    lora = ["--use_lora", "--learning_rate", "1e-4", "--with_prior_preservation", "--class_prompt", "a photo of dog",
            "--sample_batch_size", "4", "--class_image_inference_steps", "25"]
    modes = {
        f"class images ({args.class_images}, generated)": lora + ["--num_class_images", str(args.class_images)],
        "base_prediction (no class images)": lora + ["--prior_preservation_mode", "base_prediction"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models, photos = make_assets(tmp)
        for name, extra in modes.items():
            result = spawn("train", models["sd"], photos, tempfile.mkdtemp(dir=tmp), extra, 2, args.steps)
            rows.append((name, result))
    print("| prior preservation | launch to first step (s) | steps/s after | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['launch_to_first_step_s']:.1f} | {r['steps_per_second']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
