"""Evaluation prompts: DreamBench's templates (shipped), a prompts file, or a subset spread over either; the
identifier and class filled in."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from ppdreambooth.errors import ConfigError

PROMPTS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources", "dreambench_prompts.json")

def dreambench() -> dict:
    with open(PROMPTS_PATH, encoding="utf-8") as f:
        return json.load(f)


def spread(items: Sequence, count: Optional[int]) -> list:
    """`count` items spread evenly over `items` (all of them when count is None or large enough)."""
    items = list(items)
    if not count or count >= len(items):
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def resolve_prompts(prompt_set: str = "auto", prompts_file: Optional[str] = None, identifier: str = "sks",
                    class_name: Optional[str] = None, num_prompts: Optional[int] = None):
    """(prompts, description). Templates and file lines may hold `{}`, filled with "identifier class"."""
    subject = " ".join(part for part in (identifier, class_name) if part)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            templates = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not templates:
            raise ConfigError(f"{prompts_file} holds no prompts")
        description = prompts_file
    else:
        data = dreambench()
        if prompt_set == "auto":
            prompt_set = "live" if (class_name or "").lower() in data["live_classes"] else "object"
        if not class_name:
            raise ConfigError("the DreamBench prompts need the subject's class: pass --class_name (e.g. dog), "
                              "or give your own --prompts_file")
        templates = data[prompt_set]
        description = f"DreamBench {prompt_set} prompts"
    if any("{}" in t for t in templates) and not class_name and prompts_file:
        raise ConfigError(f"{prompts_file} has '{{}}' placeholders: pass --class_name (and --identifier)")
    templates = spread(templates, num_prompts)
    return [t.replace("{}", subject) for t in templates], f"{description} ({len(templates)})"


def subject_words(instance_prompt: str, class_name: Optional[str]) -> tuple:
    """(identifier, class) for the DreamBench templates: the class is `class_name` or the prompt's last word,
    the identifier the word before the class ("a photo of sks dog" -> sks, dog)."""
    words = instance_prompt.replace(",", " ").split()
    class_name = class_name or (words[-1] if words else None)
    before = [w for i, w in enumerate(words[:-1]) if words[i + 1] == class_name]
    return (before[-1] if before else ""), class_name
