"""Gradient clipping by global norm: Paddle's `ClipGradByGlobalNorm` against `ppdreambooth.modeling.clipping.GlobalNormClip`
on the real gradients of a tiny denoiser (CPU), alternating, in one process.

    python benchmarks/bench_clipping.py [--family sd|sdxl|sd3] [--repeats 200]

Prints milliseconds per clip (median of alternating rounds) and checks the two give identical gradients.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3"])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import numpy as np
    import paddle

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_training import floor_inputs
    from ppdreambooth.modeling.clipping import GlobalNormClip
    from ppdreambooth.families import detect_family
    from ppdreambooth.families.loading import load_component
    from ppdreambooth.families.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny")
        build_tiny_pipeline(path, family=args.family)
        family = detect_family(path)
        denoiser = load_component(path, family.denoiser, family)
    latents, call = floor_inputs(denoiser, 1)
    ((call() - paddle.randn(latents.shape)) ** 2).mean().multiply(paddle.to_tensor(1e3)).backward()
    params_grads = [(p, p.grad) for p in denoiser.parameters() if p.grad is not None]
    stock, ours = paddle.nn.ClipGradByGlobalNorm(1.0), GlobalNormClip(1.0)

    def copies():
        return [(p, g.clone()) for p, g in params_grads]

    expected, got = stock(copies()), ours(copies())
    identical = all(np.array_equal(a.numpy(), b.numpy()) for (_, a), (_, b) in zip(expected, got))
    times = {"Paddle ClipGradByGlobalNorm": [], "ppdreambooth GlobalNormClip": []}
    for _ in range(args.repeats):
        for name, clip in (("Paddle ClipGradByGlobalNorm", stock), ("ppdreambooth GlobalNormClip", ours)):
            grads = copies()  # not timed: each clip gets fresh gradients (ours scales them in place)
            start = time.perf_counter()
            clip(grads)
            times[name].append(time.perf_counter() - start)
    print(f"tiny {args.family} denoiser: {len(params_grads)} gradient tensors; clipped gradients identical: {identical}")
    print("| clip | ms per step (median) |\n| --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
