"""The subjects of a run: the single-subject flags and/or a `concepts` list.

A concept is one subject: its photos and prompt, and (with prior preservation) its class folder and
prompt. In a JSON config:

    "concepts": [
      {"instance_data_dir": "photos/dog", "instance_prompt": "a photo of sks dog",
       "class_data_dir": "class/dog", "class_prompt": "a photo of dog", "num_class_images": 100, "repeats": 2},
      {"instance_data_dir": "photos/cat", "instance_prompt": "a photo of zwx cat", ...}
    ]

On the command line `--concepts` takes the same list as JSON text, or the path of a .json file holding it.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from ppdreambooth.config.ranges import RANGES
from ppdreambooth.errors import ConfigError


@dataclass
class Concept:
    instance_data_dir: str
    instance_prompt: str
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None
    num_class_images: Optional[int] = None  # default: --num_class_images
    repeats: int = 1  # how many times each instance photo appears per epoch
    instance_mask_dir: Optional[str] = None  # --masked_loss: this subject's masks (default: --alpha_mask)


def _concept_from_dict(entry, index: int) -> Concept:
    if not isinstance(entry, dict):
        raise ConfigError(f"concepts[{index}] must be an object with instance_data_dir and instance_prompt.")
    names = [f.name for f in dataclasses.fields(Concept)]
    for key in entry:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown key '{key}' in concepts[{index}].{hint}")
    missing = [n for n in ("instance_data_dir", "instance_prompt") if not entry.get(n)]
    if missing:
        raise ConfigError(f"concepts[{index}] needs {' and '.join(missing)}.")
    concept = Concept(**entry)
    if not isinstance(concept.repeats, int) or concept.repeats < 1:
        raise ConfigError(f"concepts[{index}].repeats must be a positive integer, got {concept.repeats!r}.")
    valid = RANGES["num_class_images"]
    if concept.num_class_images is not None and not valid.accepts(concept.num_class_images):
        raise ConfigError(f"concepts[{index}].num_class_images {concept.num_class_images!r} is out of range: it must "
                          f"be {valid.describe()}.")
    return concept


def parse_concepts(text: Optional[str]) -> List[Concept]:
    """`--concepts` value (JSON text or a .json path) -> concepts."""
    if not text:
        return []
    if text.strip().endswith(".json") and os.path.isfile(text.strip()):
        with open(text.strip(), encoding="utf-8") as f:
            text = f.read()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--concepts is not valid JSON ({e}); give a list of objects or a .json file.") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError("--concepts must be a non-empty JSON list of objects.")
    return [_concept_from_dict(entry, i) for i, entry in enumerate(entries)]


def resolve_concepts(data_args) -> List[Concept]:
    """All concepts of a run (the single-subject flags first; `--concepts` read from its JSON text or file), each
    checked for what prior preservation needs."""
    concepts = []
    if data_args.instance_data_dir or data_args.instance_prompt:
        concepts.append(Concept(data_args.instance_data_dir, data_args.instance_prompt, data_args.class_data_dir,
                                data_args.class_prompt, instance_mask_dir=data_args.instance_mask_dir))
    concepts += parse_concepts(data_args.concepts)
    for n, concept in enumerate(concepts):
        where = "--instance_prompt" if n == 0 and data_args.instance_prompt else f"concepts[{n}].instance_prompt"
        if isinstance(concept.instance_prompt, str) and not concept.instance_prompt.strip():
            raise ConfigError(f"{where} is empty: give the subject's prompt with its identifier, e.g. "
                              "'a photo of sks dog'.")
        if concept.num_class_images is None:
            concept.num_class_images = data_args.num_class_images
    if data_args.with_prior_preservation:
        check_prior_preservation(data_args, concepts)
    check_mask_sources(data_args, concepts)
    return concepts


def check_mask_sources(data_args, concepts: List[Concept]) -> None:
    """With --masked_loss every concept needs its masks: its own mask folder, or the photos' alpha; a mask folder
    without --masked_loss would be ignored, so it is refused."""
    for n, concept in enumerate(concepts):
        where = "--instance_mask_dir" if n == 0 and data_args.instance_data_dir else f"concepts[{n}].instance_mask_dir"
        if concept.instance_mask_dir and not getattr(data_args, "masked_loss", False):
            raise ConfigError(f"{where} only acts with --masked_loss; add --masked_loss (or drop it).")
        if not getattr(data_args, "masked_loss", False):
            continue
        if concept.instance_mask_dir and data_args.alpha_mask:
            raise ConfigError(f"{where} and --alpha_mask both give masks; keep one.")
        if not concept.instance_mask_dir and not data_args.alpha_mask:
            raise ConfigError(f"--masked_loss: {where} is not set for {concept.instance_data_dir}; give its mask "
                              "folder, or --alpha_mask to use the photos' transparency.")
        if concept.instance_mask_dir and not os.path.isdir(concept.instance_mask_dir):
            raise ConfigError(f"{where} {concept.instance_mask_dir!r} is not a folder; point it at the folder of "
                              "masks (one <photo stem>.png per photo).")


def check_prior_preservation(data_args, concepts: List[Concept]) -> None:
    """Prior preservation needs a class prompt per concept, and a class folder unless the prior is the base
    model's own prediction."""
    needed = ("class_prompt",) if data_args.prior_preservation_mode == "base_prediction" else ("class_data_dir",
                                                                                              "class_prompt")
    for i, concept in enumerate(concepts):
        missing = [n for n in needed if not (getattr(concept, n) or "").strip()]
        if missing:
            where = "" if i == 0 and data_args.instance_data_dir else f" (concepts entry {concept.instance_data_dir})"
            raise ConfigError(
                "--with_prior_preservation needs " + " and ".join(f"--{m}" for m in missing) + where
                + " (a folder for class images and a prompt such as 'a photo of dog')."
            )
