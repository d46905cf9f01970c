"""The pretraining set and the held-out prompts, rendered from seeded scenes, plus the tensor conversions.

Everything random here comes from NumPy generators seeded from the build seed, so a build is a function of its
seed (Paddle's own RNG is only used to initialise weights, under `paddle.seed`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .world import SUBJECT, Scene, pretraining_scenes, render, sample_scene

IMAGE_SIZE = 32
# The held-out prompts come from a stream seeded apart from the pretraining scenes'; the subject's combination is
# excluded there too (it is DreamBooth's to teach, not the base model's).
HELD_OUT_SEED_OFFSET = 1_000_003


def render_scenes(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3) renders of `scenes`."""
    return np.stack([render(scene, size)[0] for scene in scenes])


def held_out_prompts(n: int, seed: int, plain_share: float = 0.5) -> List[str]:
    """n distinct captions of fresh scenes (a stream separate from the pretraining one), about `plain_share` of
    them plain and the rest patterned. The pretraining set leaves these captions out, so they test whether the
    model composes attributes it saw only in other combinations (a plain caption is one of just 224, so a
    pretraining set of thousands would otherwise contain them all)."""
    rng = np.random.default_rng(seed + HELD_OUT_SEED_OFFSET)
    wanted = {"plain": round(n * plain_share)}
    wanted["patterned"] = n - wanted["plain"]
    prompts: List[str] = []
    taken = {"plain": 0, "patterned": 0}
    while len(prompts) < n:
        scene = sample_scene(rng)
        kind = "plain" if scene.pattern == "plain" else "patterned"
        caption = scene.caption()
        if not SUBJECT.matches(scene) and caption not in prompts and taken[kind] < wanted[kind]:
            prompts.append(caption)
            taken[kind] += 1
    return prompts


def pretraining_set(n: int, seed: int, held_out: Sequence[str] = ()) -> Tuple[np.ndarray, List[str]]:
    """(images, captions) of n pretraining scenes: about half plain, a quarter striped, a quarter halves (the
    world's default mix), never the subject's combination nor a held-out caption."""
    excluded = set(held_out)
    scenes = [scene for scene in pretraining_scenes(n + n // 4 + 64, seed) if scene.caption() not in excluded][:n]
    assert len(scenes) == n, "too many held-out captions for the margin drawn"
    return render_scenes(scenes), [scene.caption() for scene in scenes]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC in [0, 255] -> float32 NCHW in [-1, 1], the VAE's input range."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, as the pipeline's output would be."""
    array = np.clip((np.asarray(images).transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255)
    return np.round(array).astype(np.uint8)
