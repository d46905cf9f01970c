"""MODEL_CARD.md of a built toy-world model: how it was built, what it measures, and the weights' sha256.

The digests are written as a table with one row per weight file (`| \\`path\\` | bytes | \\`sha256\\` |`), which
`card_digests` reads back, so a test can check that the shipped weights are the ones the card describes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List

from .evaluate_base import rates_table

CARD_NAME = "MODEL_CARD.md"
_DIGEST_ROW = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$")


def digest_table(digests: Dict[str, Dict[str, object]]) -> List[str]:
    lines = ["| file | bytes | sha256 |", "| --- | --- | --- |"]
    lines += [f"| `{path}` | {entry['bytes']:,} | `{entry['sha256']}` |" for path, entry in sorted(digests.items())]
    return lines


def card_digests(folder: str) -> Dict[str, str]:
    """{relative path: sha256} as recorded in the folder's card."""
    with open(os.path.join(folder, CARD_NAME), encoding="utf-8") as f:
        matches = (_DIGEST_ROW.match(line.strip()) for line in f)
        return {m.group(1): m.group(3) for m in matches if m}


def _subject_lines(check: Dict[str, object]) -> List[str]:
    keys = ("background_ok", "class_ok", "colour_ok", "pattern_ok", "all_ok")
    counts = ", ".join(f"{key} {check[key]}/{check['photos']}" for key in keys)
    return [f"Subject photos (`world.subject_scenes`, the red and white striped cross on black and on blue) encoded "
            f"and decoded by the VAE, scored with `score_image` against their own captions: {counts}; mean absolute "
            f"pixel error {check['mean_abs_error']:.1f}/255.", "",
            "Readings (background/class/colours/pattern): " + ", ".join(f"`{r}`" for r in check["readings"])]


def _recon_lines(rates: Dict[str, float], images: int) -> List[str]:
    parts = ", ".join(f"{key} {value:.1%}" for key, value in rates.items() if key != "object_present")
    return [f"Reconstructions of {images} renders of fresh scenes (all patterns), read back with "
            f"`attribute_rates`: {parts}. This is the ceiling for generated images."]


def card_text(info: Dict[str, object]) -> str:
    """The card, from the build's record (see `pretrain.build`)."""
    evaluation = info["evaluation"]
    lines = [
        "# Toy-world Stable Diffusion 1.x (built from code)",
        "",
        "A tiny SD 1.x pipeline pretrained on the toy world of `ppdreambooth.toyworld.world` (32x32 images: one "
        "circle, square, triangle or cross, plain, striped or in halves, in the 8 palette colours, on a plain "
        "background), so that DreamBooth can be scored exactly with `toyworld.scoring`. Pretraining never showed "
        f"THE SUBJECT (a red and white striped cross) nor the word `sks`, whose embedding is as initialised "
        f"(checked at build time: {info['untrained_tokens_unchanged']}).",
        "",
        "## Build",
        "",
        f"```\n{info['command']}\n```",
        "",
        f"Seed {info['seed']}, OMP_NUM_THREADS={info['threads']}. Step counts are fixed by the recipe and every "
        "random draw comes from the seed, so the same command on one thread gives the same weights. "
        f"Wall-clock of this build: {info['total_seconds'] / 60:.1f} minutes; per phase:",
        "",
        "| phase | seconds |",
        "| --- | --- |",
        *[f"| {phase} | {seconds:.0f} |" for phase, seconds in info["seconds"].items()],
        "",
        "## Recipe",
        "",
        *[f"- **{name}:** {text}" for name, text in info["recipe"].items()],
        "",
        "## Parameters",
        "",
        "| component | parameters |",
        "| --- | --- |",
        *[f"| {name} | {count:,} |" for name, count in info["parameters"].items()],
        "",
        "## VAE reconstruction check",
        "",
        *_subject_lines(info["subject_check"]),
        "",
        *_recon_lines(info["reconstruction_rates"], info["reconstruction_images"]),
        "",
        "## Held-out evaluation",
        "",
        f"{evaluation['prompts']} held-out prompts (captions left out of pretraining, half plain, half striped or "
        f"halves), {evaluation['images_per_prompt']} seeded images each; {evaluation['sampler']} sampler, "
        f"{evaluation['steps']} steps, guidance {evaluation['guidance']}, {evaluation['size']}x{evaluation['size']}; "
        "scored with `toyworld.scoring.attribute_rates`. Examples: "
        + ", ".join(f"`{p}`" for p in evaluation["example_prompts"][:3]) + ".",
        "",
        rates_table(evaluation),
        "",
        f"Bar (background >= 90%, class >= 80%, colour >= 80% over all prompts): "
        f"{'met' if evaluation['bar_met'] else 'NOT met'}.",
        "",
        "## Weights",
        "",
        *digest_table(info["digests"]),
        "",
        "<!-- build record -->",
        "```json",
        json.dumps({k: v for k, v in info.items() if k not in ("digests", "evaluation")}, indent=1, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: str, info: Dict[str, object]) -> str:
    path = os.path.join(folder, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card_text(info))
    return path
