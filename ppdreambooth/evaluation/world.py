"""Personalisation scores in the toy world (`ppdreambooth.toyworld`): where DINO and CLIP are learned proxies, here
every attribute of a generated image is read exactly from its pixels, so the four quantities DreamBooth trades
against each other can be measured on a CPU:

- subject fidelity: share of subject prompts ("a sks cross on a green background") whose image shows the subject
  (its class and its two-coloured stripes);
- prompt fidelity: share of subject prompts whose image has the prompted background;
- language drift: share of plain class prompts ("a blue cross on a green background") whose image no longer shows
  the plain class in the prompted colour (1 - class preservation);
- background leakage: share of subject prompts whose image shows one of the instance photos' backgrounds although
  the prompt asks for another.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ppdreambooth.errors import ConfigError
from ppdreambooth.toyworld import SHAPES, SUBJECT, Subject
from ppdreambooth.toyworld.scoring import (
    background_leakage,
    language_drift,
    prompt_fidelity,
    read_background,
    score_image,
    shows_subject,
    read_image,
)

# (key, label for plots and tables, what it measures)
WORLD_METRICS = (
    ("subject_fidelity", "subject fidelity", "subject prompts showing the subject"),
    ("prompt_fidelity", "prompt fidelity", "subject prompts with the prompted background"),
    ("language_drift", "language drift", "class prompts no longer giving the plain class"),
    ("background_leakage", "background leakage", "subject prompts showing a photo's background"),
)
CLASS_COLOURS = ("red", "white", "blue", "yellow")  # the subject's own colours first: where drift shows
CLASS_BACKGROUNDS = ("green", "cyan")


def world_subject(identifier: str, class_name: Optional[str]) -> Subject:
    """The toy world's subject named by an instance prompt's identifier and class ("a sks cross")."""
    if class_name not in SHAPES:
        raise ConfigError(f"world scoring needs a subject of the toy world: its class must be one of "
                          f"{', '.join(SHAPES)}, not {class_name!r} (e.g. --instance_prompt 'a sks cross').")
    return Subject(shape=class_name, identifier=identifier or SUBJECT.identifier)


def world_prompts(subject: Subject = SUBJECT) -> Tuple[List[str], List[str]]:
    """(subject prompts, plain class prompts): the subject on each background that is neither a photo background
    nor one of its colours, and the plain class in a few colours on a few backgrounds."""
    subject_prompts = [f"a {subject.identifier} {subject.shape} on a {background} background"
                       for background in subject.prompt_backgrounds()]
    class_prompts = [f"a {colour} {subject.shape} on a {background} background"
                     for colour in CLASS_COLOURS for background in CLASS_BACKGROUNDS if colour != background]
    return subject_prompts, class_prompts


class WorldScorer:
    """Scores generated images of the world prompts; the instance photos give the backgrounds that count as leaked.
    The same interface as `FidelityScorer` (`metrics`, `score`), so evaluation and the training callback take
    either."""

    metrics = tuple((key, label) for key, label, _ in WORLD_METRICS)

    def __init__(self, photos: Sequence, subject: Subject = SUBJECT):
        self.subject = subject
        self.instance_backgrounds = sorted({read_background(np.asarray(photo.convert("RGB"))) for photo in photos})

    def score(self, images_by_prompt: Sequence[Sequence], prompts: Sequence[str]) -> dict:
        """{"overall": {metric: share}, "per_prompt": [{prompt, subject, background, class_plain}]}."""
        if len(images_by_prompt) != len(prompts):
            raise ValueError(f"{len(images_by_prompt)} groups of images for {len(prompts)} prompts")
        arrays = [[np.asarray(image.convert("RGB")) for image in group] for group in images_by_prompt]
        subject_rows = [(image, prompt) for group, prompt in zip(arrays, prompts) for image in group
                        if self.subject.identifier in prompt.split()]
        class_rows = [(image, prompt) for group, prompt in zip(arrays, prompts) for image in group
                      if self.subject.identifier not in prompt.split()]
        subject_images = [image for image, _ in subject_rows]
        subject_prompts = [prompt for _, prompt in subject_rows]
        overall = {
            "subject_fidelity": _share([shows_subject(read_image(image), self.subject) for image in subject_images]),
            "prompt_fidelity": prompt_fidelity(subject_images, subject_prompts) if subject_rows else float("nan"),
            "language_drift": language_drift(*zip(*class_rows)) if class_rows else float("nan"),
            "background_leakage": background_leakage(subject_images, subject_prompts, self.instance_backgrounds)
            if subject_rows else float("nan"),
        }
        per_prompt = []
        for group, prompt in zip(arrays, prompts):
            scores = [score_image(image, prompt) for image in group]
            per_prompt.append({"prompt": prompt,
                               "shows_subject": _share([shows_subject(s, self.subject) for s in scores]),
                               "background_ok": _share([s.get("background_ok", False) for s in scores]),
                               "class_ok": _share([s.get("class_ok", False) for s in scores]),
                               "colour_ok": _share([s.get("colour_ok", False) for s in scores])})
        return {"overall": overall, "per_prompt": per_prompt}


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def format_world_table(metrics: Dict[str, Dict[str, float]], images: int, prompts: int) -> str:
    """The four scores for the trained model, the base model and the change, one line each."""
    has_base = "base" in metrics
    lines = [f"Toy-world personalisation over {prompts} prompts x {images} images (exact pixel scores)",
             f"{'':22}{'trained':>9}" + (f"{'base':>9}{'change':>9}" if has_base else "") + "   what it counts"]
    for key, label, what in WORLD_METRICS:
        line = f"{label:22}{metrics['trained'][key]:9.3f}"
        if has_base:
            line += f"{metrics['base'][key]:9.3f}{metrics['trained'][key] - metrics['base'][key]:+9.3f}"
        lines.append(f"{line}   {what}")
    return "\n".join(lines)
