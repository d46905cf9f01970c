"""A synthetic image world in which DreamBooth personalisation can be scored exactly.

`world` renders one flat-coloured object (circle, square, triangle, cross; plain, striped or halves) on a plain
background from a seeded `Scene`, and defines THE SUBJECT (a red and white striped cross) that pretraining never
shows. `scoring` reads those attributes back from pixels and turns them into the four personalisation scores:
subject fidelity, prompt fidelity, class preservation (language drift) and background leakage. Numpy only.
"""
from .scoring import (
    attribute_rates,
    background_leakage,
    class_preservation,
    language_drift,
    prompt_fidelity,
    read_image,
    score_image,
    subject_fidelity,
)
from .world import (
    COLOURS,
    PALETTE,
    PATTERNS,
    SHAPES,
    SUBJECT,
    VOCABULARY,
    Scene,
    Subject,
    parse_prompt,
    pretraining_scenes,
    render,
    sample_scene,
    subject_photos,
    subject_scenes,
)

__all__ = [
    "COLOURS", "PALETTE", "PATTERNS", "SHAPES", "SUBJECT", "VOCABULARY", "Scene", "Subject", "attribute_rates",
    "background_leakage", "class_preservation", "language_drift", "parse_prompt", "pretraining_scenes",
    "prompt_fidelity", "read_image", "render", "sample_scene", "score_image", "subject_fidelity",
    "subject_photos", "subject_scenes",
]
