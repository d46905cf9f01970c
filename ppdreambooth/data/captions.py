"""Caption handling (kohya sd-scripts' options), for instance examples only: caption dropout, shuffled tags,
tags kept in place, tag dropout. The tag(s) holding the instance prompt always stay whole and first. Pure
functions of a caption and an RNG (the dataset passes each item's seeded RNG, so resume stays exact)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class CaptionOptions:
    """kohya sd-scripts' caption options, applied to instance examples only (class rows never change).

    `dropout_rate`: the caption is replaced by the empty prompt with this probability. `shuffle`: the
    comma-separated tags are shuffled. `keep_tokens`: the first k tags stay in place and are never dropped.
    `tag_dropout_rate`: each other tag is dropped with this probability. The tag(s) holding the instance prompt
    always stay whole and first (and count as one of the `keep_tokens`)."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """Options that make captions no cache can hold (a new permutation at each step)."""
        return self.shuffle or self.tag_dropout_rate > 0

    @property
    def active(self) -> bool:
        return self.dropout_rate > 0 or self.varies

    def describe(self) -> str:
        parts = [f"dropout {self.dropout_rate:g}"] if self.dropout_rate > 0 else []
        if self.shuffle:
            parts.append("tags shuffled")
        if self.tag_dropout_rate > 0:
            parts.append(f"tag dropout {self.tag_dropout_rate:g}")
        if self.varies and self.keep_tokens:
            parts.append(f"first {self.keep_tokens} tag(s) kept")
        return ", ".join(parts)


def caption_tags(caption: str, prompt: Optional[str]) -> Tuple[List[str], int]:
    """The caption's comma-separated tags, with the tag(s) holding `prompt` (the instance prompt, which may itself
    hold commas) merged into one and moved first; returns (tags, how many of them stay fixed: 1 with the prompt
    found, else 0)."""
    spans, start = [], 0
    for part in caption.split(","):
        spans.append((start, start + len(part)))
        start += len(part) + 1
    at = caption.find(prompt) if prompt else -1
    if at < 0:
        return [t for t in (caption[s:e].strip() for s, e in spans) if t], 0
    end = at + len(prompt)
    inside = [n for n, (s, e) in enumerate(spans) if s < end and e > at]
    head = caption[spans[inside[0]][0]:spans[inside[-1]][1]].strip()
    rest = [caption[s:e].strip() for n, (s, e) in enumerate(spans) if n not in inside]
    return [head] + [t for t in rest if t], 1


def caption_plan(caption: str, prompt: Optional[str], options: CaptionOptions) -> Optional[Tuple[List[str], int]]:
    """(tags, fixed count) when shuffling or tag dropout can change this caption; None when they cannot."""
    tags, fixed = caption_tags(caption, prompt)
    fixed = max(fixed, options.keep_tokens)
    free = len(tags) - fixed
    if (options.shuffle and free >= 2) or (options.tag_dropout_rate > 0 and free >= 1):
        return tags, fixed
    return None


def vary_caption(plan: Tuple[List[str], int], options: CaptionOptions, rng: random.Random) -> str:
    """One draw of a caption's tags (`caption_plan`): the fixed ones in place, each other one dropped with
    `tag_dropout_rate`, then the rest shuffled (kohya's order); the draws come from `rng`."""
    tags, fixed = plan
    kept, free = tags[:fixed], tags[fixed:]
    if options.tag_dropout_rate > 0:
        free = [t for t in free if rng.random() >= options.tag_dropout_rate]
    if options.shuffle:
        rng.shuffle(free)
    return ", ".join(kept + free)
