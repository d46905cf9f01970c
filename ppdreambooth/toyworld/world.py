"""The toy world: one flat-coloured object on a plain background, rendered exactly from a seeded scene.

Everything a caption says can be read back from the pixels (see `scoring.py`), so a model trained on this world
can be scored without a learned judge. Geometry is kept in units of the image side, so one `Scene` renders at any
size; patterns are anchored to the image grid in bands of `size // 8` pixels, which is a whole number of latent
cells for a VAE downsampling by 4 or 8, so a band never straddles a cell and blurs into a mix of its two colours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# The eight corners of the RGB cube: every pair is at least 255 apart, the most any 8 colours can be.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: Tuple[str, ...] = tuple(PALETTE)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
PATTERNS: Tuple[str, ...] = ("plain", "striped", "halves")
TWO_COLOUR_PATTERNS = ("striped", "halves")

RADIUS_RANGE = (0.30, 0.40)  # of the image side: 10-13 px at 32 px
# How far (in image sides) an object's centre strays from the middle: up to 2 px at 32 px. Objects anywhere in the
# frame (8-12 px radius) left a tiny UNet trained in the build's budget drawing blobs read as the right shape in
# 35-44% of held-out prompts; near the middle and a little larger, the same recipe drew the asked shape in 77%
# after half its steps. Size and position still vary; the shapes are what the world is about.
POSE_JITTER = 0.06
MARGIN = 1 / 16  # of the image side kept clear on every edge (2 px at 32), so the border is all background
CROSS_ARM = 0.36  # half-width of a cross's arms, in radii: its notches are about a third of its width, so they
# survive a VAE that downsamples by 4 (a five-pointed star's points did not: a VAE trained in the build's budget
# gave stars back as pentagons, read as circles, in 70% of reconstructions, while the other shapes came back right)


def _regular_polygon(radius: float, count: int, start_degrees: float) -> np.ndarray:
    angles = np.deg2rad(start_degrees + 360.0 / count * np.arange(count))
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _cross_polygon(extent: float, arm: float) -> np.ndarray:
    """A plus sign reaching `extent` from its centre, arms `arm` wide on each side of their axis."""
    e, w = extent, arm
    return np.array([[-w, -e], [w, -e], [w, -w], [e, -w], [e, w], [w, w], [w, e], [-w, e], [-w, w], [-e, w],
                     [-e, -w], [-w, -w]])


# Unit shapes, y pointing down (image rows). Sizes are chosen so every shape's bounding box is close to 2 x 2,
# i.e. "radius" means about half the object's width whatever the class.
UNIT_POLYGONS: Dict[str, np.ndarray] = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": _regular_polygon(1.15, 3, -90.0),  # equilateral, point up
    "cross": _cross_polygon(0.95, CROSS_ARM),  # a plus sign
}


def shape_extent(shape: str) -> Tuple[float, float, float, float]:
    """(left, top, right, bottom) of the unit shape: where it reaches from its centre, in radii."""
    if shape == "circle":
        return (-1.0, -1.0, 1.0, 1.0)
    points = UNIT_POLYGONS[shape]
    return (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))


def _inside_polygon(points: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over the query points; works for the cross's concave outline."""
    inside = np.zeros(np.broadcast(u, v).shape, bool)
    for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0)):
        crossing = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crossing & (u < x_at_v)
    return inside


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in radii from the shape's centre, lie in the unit shape. Shared by the renderer and
    the scorer's class templates, so both use the very same geometry."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    return _inside_polygon(UNIT_POLYGONS[shape], u, v)


@dataclass(frozen=True)
class Scene:
    """One picture of the world. `centre` (x, y) and `radius` are fractions of the image side; `colour2` is the
    second colour of a striped or halves object (None for plain)."""

    shape: str
    colour: str
    background: str
    pattern: str = "plain"
    colour2: Optional[str] = None
    centre: Tuple[float, float] = (0.5, 0.5)
    radius: float = 0.3

    def __post_init__(self) -> None:
        known = self.shape in SHAPES and self.pattern in PATTERNS and {self.colour, self.background} <= set(PALETTE)
        second_ok = (self.colour2 in PALETTE) if self.pattern in TWO_COLOUR_PATTERNS else self.colour2 is None
        if not (known and second_ok):
            raise ValueError(f"not a scene of this world: {self}")

    def caption(self) -> str:
        """'a red cross on a blue background', 'a red and white striped cross on ...', 'a half red half white ...'."""
        if self.pattern == "striped":
            look = f"{self.colour} and {self.colour2} striped"
        elif self.pattern == "halves":
            look = f"half {self.colour} half {self.colour2}"
        else:
            look = self.colour
        return f"a {look} {self.shape} on a {self.background} background"

    def short_captions(self) -> Tuple[str, str, str]:
        return short_captions(self.caption())


def short_captions(caption: str) -> Tuple[str, str, str]:
    """A full caption with parts left out, as real captions often are: the class alone ('a cross'), the object
    without its setting ('a red cross'), the class in its setting ('a cross on a blue background'). A base model
    that never saw such captions draws noise for DreamBooth's class prompt ('a cross'), and its class images then
    teach the class word that noise: the opposite of prior preservation."""
    look_and_shape, setting = caption[len("a "):].split(" on a ")
    shape = look_and_shape.split()[-1]
    return f"a {shape}", f"a {look_and_shape}", f"a {shape} on a {setting}"


def stripe_width(size: int) -> int:
    """Band height in pixels: 4 at 32 px, one latent cell of a VAE downsampling by 4."""
    return max(1, size // 8)


def render(scene: Scene, size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 size x size x 3 image, bool object mask). Pixel centres are sampled once: no anti-aliasing, so every
    pixel is exactly a palette colour."""
    rows, cols = np.mgrid[0:size, 0:size]
    x = (cols + 0.5) / size
    y = (rows + 0.5) / size
    u = (x - scene.centre[0]) / scene.radius
    v = (y - scene.centre[1]) / scene.radius
    mask = inside_shape(scene.shape, u, v)
    if scene.pattern == "striped":
        first = (rows // stripe_width(size)) % 2 == 0
    elif scene.pattern == "halves":
        first = x < scene.centre[0]
    else:
        first = np.ones_like(mask)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[scene.background]
    image[mask & first] = PALETTE[scene.colour]
    if scene.colour2 is not None:
        image[mask & ~first] = PALETTE[scene.colour2]
    return image, mask


def _sample_pose(rng: np.random.Generator, shape: str,
                 radius_range: Tuple[float, float] = RADIUS_RANGE) -> Tuple[Tuple[float, float], float]:
    """A radius, and a centre within POSE_JITTER of the middle of the places that keep the whole object MARGIN
    inside the image (clipped to them)."""
    radius = float(rng.uniform(*radius_range))
    left, top, right, bottom = shape_extent(shape)
    low_x, high_x = MARGIN - left * radius, 1 - MARGIN - right * radius
    low_y, high_y = MARGIN - top * radius, 1 - MARGIN - bottom * radius
    cx = float(np.clip((low_x + high_x) / 2 + rng.uniform(-POSE_JITTER, POSE_JITTER), low_x, high_x))
    cy = float(np.clip((low_y + high_y) / 2 + rng.uniform(-POSE_JITTER, POSE_JITTER), low_y, high_y))
    return (cx, cy), radius


def sample_scene(rng: np.random.Generator, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS,
                 patterns: Sequence[str] = PATTERNS, pattern_weights: Optional[Sequence[float]] = None) -> Scene:
    """A random scene whose object colours all differ from the background (else the object would vanish)."""
    shape = str(rng.choice(list(shapes)))
    pattern = str(rng.choice(list(patterns), p=None if pattern_weights is None else np.asarray(pattern_weights)))
    background, colour, *rest = (str(c) for c in rng.permutation(list(colours))[:3])
    colour2 = rest[0] if pattern in TWO_COLOUR_PATTERNS else None
    centre, radius = _sample_pose(rng, shape)
    return Scene(shape, colour, background, pattern, colour2, centre, radius)


@dataclass(frozen=True)
class Subject:
    """The personalisation subject: a combination the pretraining world never shows, though it shows each part
    (crosses, stripes, red and white objects, other striped crosses) so the models can represent it."""

    shape: str = "cross"
    pattern: str = "striped"
    colours: Tuple[str, str] = ("red", "white")
    photo_backgrounds: Tuple[str, ...] = ("black", "blue")
    identifier: str = "sks"

    def matches(self, scene: Scene) -> bool:
        """Whether a scene shows the subject's (shape, pattern, colour pair), in either colour order."""
        return (scene.shape, scene.pattern) == (self.shape, self.pattern) and \
            {scene.colour, scene.colour2} == set(self.colours)

    def instance_prompt(self) -> str:
        return f"a {self.identifier} {self.shape}"

    def prompt_backgrounds(self) -> Tuple[str, ...]:
        """Backgrounds to prompt for in evaluation: neither a photo background nor a subject colour (a white
        background would swallow the white stripes)."""
        return tuple(c for c in COLOURS if c not in self.photo_backgrounds and c not in self.colours)


SUBJECT = Subject()


def subject_scenes(n: int = 5, seed: int = 0, subject: Subject = SUBJECT) -> List[Scene]:
    """The subject in n poses (size, position), cycling through its photo backgrounds."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        centre, radius = _sample_pose(rng, subject.shape)
        background = subject.photo_backgrounds[i % len(subject.photo_backgrounds)]
        scenes.append(Scene(subject.shape, subject.colours[0], background, subject.pattern, subject.colours[1],
                            centre, radius))
    return scenes


def subject_photos(n: int = 5, size: int = 32, seed: int = 0, subject: Subject = SUBJECT) -> List[np.ndarray]:
    """The instance photos for DreamBooth: renders of `subject_scenes`."""
    return [render(scene, size)[0] for scene in subject_scenes(n, seed, subject)]


def pretraining_scenes(n: int, seed: int = 0, pattern_weights: Sequence[float] = (0.5, 0.25, 0.25),
                       subject: Subject = SUBJECT) -> List[Scene]:
    """n random scenes (half plain by default) with the subject's combination redrawn whenever it comes up."""
    rng = np.random.default_rng(seed)
    scenes: List[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(rng, pattern_weights=pattern_weights)
        if not subject.matches(scene):
            scenes.append(scene)
    return scenes


FILLER_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "and", "photo", "picture", "image", "background"})
VOCABULARY: Tuple[str, ...] = tuple(sorted(set(COLOURS) | set(SHAPES) | FILLER_WORDS | {"striped", "half"}))


def parse_prompt(prompt: str) -> Dict[str, Optional[str]]:
    """The attributes a prompt asks for: shape, colour, colour2, pattern, background, identifier (None when not
    asked). Object colours are the colour words before 'on'; the background is the colour word just before
    'background'. A colour without a pattern word means 'plain'; no object colour at all leaves pattern None
    (as in 'a sks cross on a green background', where the identifier decides the look). The identifier is the
    first word the world does not know."""
    words = re.findall(r"[a-z]+", prompt.lower())
    background = None
    if "background" in words:
        before = words[: words.index("background")]
        background = next((w for w in reversed(before[-2:]) if w in PALETTE), None)
    object_words = words[: words.index("on")] if "on" in words else words
    object_colours = [w for w in object_words if w in PALETTE]
    if "striped" in object_words:
        pattern: Optional[str] = "striped"
    elif "half" in object_words:
        pattern = "halves"
    else:
        pattern = "plain" if object_colours else None
    return {
        "shape": next((w for w in words if w in SHAPES), None),
        "colour": object_colours[0] if object_colours else None,
        "colour2": object_colours[1] if len(object_colours) > 1 else None,
        "pattern": pattern,
        "background": background,
        "identifier": next((w for w in words if w not in VOCABULARY), None),
    }
