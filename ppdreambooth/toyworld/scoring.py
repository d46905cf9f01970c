"""Score generated toy-world images by pixel analysis: no learned judge, so a score is exactly reproducible.

The reading (`read_image`) finds the background from the image border, the object as the pixels far from it, its
class by overlap with the world's own shape geometry stretched over the object's bounding box, its colours by
nearest palette colour, and its pattern from how those colours are laid out (rows pure: stripes; columns pure:
halves). On renders of the world itself the reading is exact; on generated images it is a tolerant judge.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .world import COLOURS, PALETTE, SHAPES, SUBJECT, Subject, inside_shape, parse_prompt, shape_extent

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], np.float64)
FAR_FROM_BACKGROUND = 128.0  # RGB distance; half the palette's smallest pairwise distance (255)
MIN_OBJECT_SHARE = 0.03  # of the image: the smallest object (a cross of radius 8 px at 32 px) covers about 14%
MIN_SECOND_COLOUR_SHARE = 0.15  # of the object: less is read as specks on a plain object
MIN_PURITY = 0.85  # pixel-weighted share of a row's (column's) majority colour for bands to count as pure


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    assert array.ndim == 3 and array.shape[2] == 3, f"expected an H x W x 3 image, got shape {array.shape}"
    return array.astype(np.float64)


def nearest_colour(rgb: np.ndarray, allowed: Sequence[str] = COLOURS) -> np.ndarray:
    """Index into COLOURS of the nearest allowed palette colour, for each pixel of an (..., 3) array."""
    allowed_idx = np.array([COLOURS.index(c) for c in allowed])
    distances = np.linalg.norm(rgb[..., None, :] - _PALETTE_RGB[allowed_idx], axis=-1)
    return allowed_idx[np.argmin(distances, axis=-1)]


def read_background(image: np.ndarray) -> str:
    """Per-channel median of the one-pixel border, as the nearest palette colour; the world keeps objects clear
    of the border, and a median ignores the odd object pixel a model may put there."""
    rgb = _as_rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return COLOURS[int(nearest_colour(np.median(border, axis=0)))]


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1).astype(np.int32)
    height, width = mask.shape
    return sum(padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def object_mask(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels far from the background colour: the object, whatever its pattern. Pixels with no such neighbour are
    dropped: a speck of noise would otherwise stretch the bounding box the class is read in (no rendered shape has
    a lone pixel)."""
    distance = np.linalg.norm(_as_rgb(image) - np.array(PALETTE[background], np.float64), axis=-1)
    far = distance > FAR_FROM_BACKGROUND
    return far & (_neighbour_count(far) > 0)


def _bounding_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def shape_overlaps(mask: np.ndarray) -> Dict[str, float]:
    """IoU of the mask with each class's unit shape stretched over the mask's bounding box (each axis on its own,
    so a squashed drawing still matches its class better than another's)."""
    top, bottom, left, right = _bounding_box(mask)
    crop = mask[top:bottom, left:right]
    rows, cols = np.mgrid[0:bottom - top, 0:right - left]
    fy = (rows + 0.5) / (bottom - top)
    fx = (cols + 0.5) / (right - left)
    overlaps = {}
    for shape in SHAPES:
        x0, y0, x1, y1 = shape_extent(shape)
        template = inside_shape(shape, x0 + fx * (x1 - x0), y0 + fy * (y1 - y0))
        overlaps[shape] = float((crop & template).sum() / (crop | template).sum())
    return overlaps


def read_colours(image: np.ndarray, mask: np.ndarray, background: str) -> List[Tuple[str, float]]:
    """(palette colour, share of the object's pixels), most common first. The background colour is not a
    candidate: a pixel far from it is never meant as it."""
    labels = nearest_colour(_as_rgb(image)[mask], [c for c in COLOURS if c != background])
    counts = np.bincount(labels, minlength=len(COLOURS))
    order = np.argsort(-counts, kind="stable")
    return [(COLOURS[i], float(counts[i] / mask.sum())) for i in order if counts[i] > 0]


def _band_purity(first: np.ndarray, second: np.ndarray) -> Tuple[float, int]:
    """For per-band (row or column) pixel counts of two colours: the pixel-weighted share of each band's majority
    colour, and how often the majority changes from one non-empty band to the next."""
    totals = first + second
    used = totals > 0
    purity = float(np.maximum(first, second)[used].sum() / totals[used].sum())
    majority = (first > second)[used]
    return purity, int(np.count_nonzero(majority[1:] != majority[:-1]))


def read_pattern(image: np.ndarray, mask: np.ndarray, colours: List[Tuple[str, float]]) -> str:
    """'plain' (one colour), 'striped' (pure rows, at least three bands), 'halves' (pure columns, two halves), or
    'mixed' (two colours in some other layout)."""
    if len(colours) < 2 or colours[1][1] < MIN_SECOND_COLOUR_SHARE:
        return "plain"
    labels = np.full(mask.shape, -1)
    labels[mask] = nearest_colour(_as_rgb(image)[mask], [colours[0][0], colours[1][0]])
    first, second = labels == COLOURS.index(colours[0][0]), labels == COLOURS.index(colours[1][0])
    row_purity, row_changes = _band_purity(first.sum(axis=1), second.sum(axis=1))
    column_purity, column_changes = _band_purity(first.sum(axis=0), second.sum(axis=0))
    if row_purity >= MIN_PURITY and row_purity > column_purity and row_changes >= 2:
        return "striped"
    if column_purity >= MIN_PURITY and column_purity > row_purity and column_changes == 1:
        return "halves"
    return "mixed"


def read_image(image: np.ndarray) -> Dict[str, object]:
    """What the image shows: background, object_present, shape, colour, colour2 (None unless the pattern has two
    colours), pattern, and the evidence (shape overlaps, colour shares)."""
    background = read_background(image)
    mask = object_mask(image, background)
    reading: Dict[str, object] = {"background": background, "object_present": False, "shape": None,
                                  "colour": None, "colour2": None, "pattern": None}
    if mask.sum() < MIN_OBJECT_SHARE * mask.size:
        return reading
    overlaps = shape_overlaps(mask)
    colours = read_colours(image, mask, background)
    pattern = read_pattern(image, mask, colours)
    reading.update(object_present=True, shape=max(overlaps, key=overlaps.get), colour=colours[0][0],
                   colour2=colours[1][0] if pattern != "plain" else None, pattern=pattern,
                   shape_overlaps=overlaps, colour_shares=dict(colours))
    return reading


def score_image(image: np.ndarray, prompt: str) -> Dict[str, object]:
    """The reading of `read_image` plus a boolean per attribute the prompt asks for (see `parse_prompt`):
    object_present always; background_ok, class_ok, colour_ok, pattern_ok when asked. A two-colour prompt's
    colour_ok needs both colours, in either order; a plain prompt's needs the dominant colour."""
    asked = parse_prompt(prompt)
    reading = read_image(image)
    present = bool(reading["object_present"])
    scores: Dict[str, object] = dict(reading, asked=asked, object_present=present)
    if asked["background"] is not None:
        scores["background_ok"] = reading["background"] == asked["background"]
    if asked["shape"] is not None:
        scores["class_ok"] = present and reading["shape"] == asked["shape"]
    if asked["colour"] is not None:
        if asked["colour2"] is None:
            scores["colour_ok"] = present and reading["colour"] == asked["colour"]
        else:
            scores["colour_ok"] = present and {reading["colour"], reading["colour2"]} == \
                {asked["colour"], asked["colour2"]}
    if asked["pattern"] is not None:
        scores["pattern_ok"] = present and reading["pattern"] == asked["pattern"]
    return scores


SCORE_KEYS = ("object_present", "background_ok", "class_ok", "colour_ok", "pattern_ok")


def _mean(flags: Sequence[bool]) -> float:
    """Share of True; NaN when nothing qualified (a rate over no images is undefined, not 0)."""
    return float(np.mean(flags)) if len(flags) else float("nan")


def shows_subject(reading: Dict[str, object], subject: Subject = SUBJECT) -> bool:
    return reading["shape"] == subject.shape and reading["pattern"] == subject.pattern and \
        {reading["colour"], reading["colour2"]} == set(subject.colours)


def subject_fidelity(images: Sequence[np.ndarray], subject: Subject = SUBJECT) -> float:
    """Share of images showing the subject: its class, its pattern and its two colours."""
    return _mean([shows_subject(read_image(image), subject) for image in images])


def attribute_rates(images: Sequence[np.ndarray], prompts: Sequence[str]) -> Dict[str, float]:
    """Per attribute, the share right among the images whose prompt asks for it; 'all' = every asked one right."""
    assert len(images) == len(prompts), (len(images), len(prompts))
    scores = [score_image(image, prompt) for image, prompt in zip(images, prompts)]
    rates = {key: _mean([s[key] for s in scores if key in s]) for key in SCORE_KEYS}
    rates["all"] = _mean([all(s[key] for key in SCORE_KEYS if key in s) for s in scores])
    return rates


def prompt_fidelity(images: Sequence[np.ndarray], prompts: Sequence[str]) -> float:
    """Share of images that show everything their prompt asks for (for 'a sks cross on a green background': a
    cross on green). The background alone is `attribute_rates(...)['background_ok']`."""
    return attribute_rates(images, prompts)["all"]


def is_plain_class_prompt(prompt: str) -> bool:
    """A prompt for the plain class object in one colour, with no identifier: 'a blue cross on a green background'."""
    asked = parse_prompt(prompt)
    return asked["identifier"] is None and asked["shape"] is not None and asked["pattern"] == "plain"


def class_preservation(images: Sequence[np.ndarray], prompts: Sequence[str]) -> float:
    """Among images for plain class prompts (others are skipped), the share that still show the prompted class,
    plain, in the prompted colour: what DreamBooth's prior preservation is meant to keep."""
    assert len(images) == len(prompts), (len(images), len(prompts))
    flags = []
    for image, prompt in zip(images, prompts):
        if is_plain_class_prompt(prompt):
            s = score_image(image, prompt)
            flags.append(bool(s["class_ok"] and s["colour_ok"] and s["pattern_ok"]))
    return _mean(flags)


def language_drift(images: Sequence[np.ndarray], prompts: Sequence[str]) -> float:
    """1 - class_preservation: how far the class word has drifted towards the subject (or elsewhere)."""
    return 1.0 - class_preservation(images, prompts)


def background_leakage(images: Sequence[np.ndarray], prompts: Sequence[str],
                       instance_backgrounds: Sequence[str]) -> float:
    """Among images whose prompt asks for a background none of the instance photos had, the share drawn on one of
    the instance photos' backgrounds: the photos' setting learned as part of the subject. Prompts with no
    background, or with an instance background, are skipped (leakage cannot show there)."""
    assert len(images) == len(prompts), (len(images), len(prompts))
    seen = set(instance_backgrounds)
    flags = []
    for image, prompt in zip(images, prompts):
        wanted = parse_prompt(prompt)["background"]
        if wanted is not None and wanted not in seen:
            flags.append(read_background(image) in seen)
    return _mean(flags)
