"""The toy world and its pixel scorer: renders are reproducible, the scorer reads every rendered caption back
exactly, wrong attributes score 0, and the four personalisation scores count exactly on hand-made cases."""
import itertools

import numpy as np
import pytest

from ppdreambooth.toyworld import scoring, world
from ppdreambooth.toyworld.world import COLOURS, PATTERNS, SHAPES, SUBJECT, Scene, parse_prompt, render


def _image(shape="cross", colour="red", background="blue", pattern="plain", colour2=None, centre=(0.5, 0.5),
           radius=0.3):
    return render(Scene(shape, colour, background, pattern, colour2, centre, radius))[0]


def test_rendering_is_deterministic_from_the_seed():
    first = [render(s)[0].tobytes() for s in world.pretraining_scenes(40, seed=3)]
    again = [render(s)[0].tobytes() for s in world.pretraining_scenes(40, seed=3)]
    other = [render(s)[0].tobytes() for s in world.pretraining_scenes(40, seed=4)]
    assert first == again and first != other
    assert [p.tobytes() for p in world.subject_photos(seed=1)] == [p.tobytes() for p in world.subject_photos(seed=1)]


def test_render_is_pure_palette_with_the_object_inside_and_the_mask_matching():
    palette = {tuple(c) for c in world.PALETTE.values()}
    for scene in world.pretraining_scenes(50, seed=0):
        image, mask = render(scene, size=32)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and mask.dtype == bool
        assert {tuple(p) for p in image.reshape(-1, 3)} <= palette
        assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any() and not mask[:, -2:].any()
        assert 0.05 < mask.mean() < 0.6
        assert (np.any(image != world.PALETTE[scene.background], axis=-1) == mask).all()


@pytest.mark.parametrize("size", [32, 64])
def test_every_rendered_scene_scores_perfectly_against_its_own_caption(size):
    count = 300 if size == 32 else 60
    rng = np.random.default_rng(123)
    for _ in range(count):
        scene = world.sample_scene(rng)
        scores = scoring.score_image(render(scene, size)[0], scene.caption())
        oks = {key: scores[key] for key in scoring.SCORE_KEYS}  # a caption asks for every attribute
        assert all(oks.values()), (scene, oks, scores)
        assert (scores["shape"], scores["background"], scores["pattern"]) == \
            (scene.shape, scene.background, scene.pattern)
        assert {scores["colour"], scores["colour2"]} == {scene.colour, scene.colour2}


def test_scorer_survives_pixel_noise():
    rng = np.random.default_rng(0)
    for scene in world.pretraining_scenes(100, seed=5):
        noisy = np.clip(render(scene)[0] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        scores = scoring.score_image(noisy, scene.caption())
        assert all(scores[key] for key in scoring.SCORE_KEYS), (scene, scores)


def test_wrong_object_colour_scores_colour_0_and_background_1():
    scores = scoring.score_image(_image(colour="red"), "a green cross on a blue background")
    assert scores["colour_ok"] is False and scores["background_ok"] is True and scores["class_ok"] is True
    two = scoring.score_image(_image(pattern="striped", colour2="white"), "a red and yellow striped cross")
    assert two["colour_ok"] is False and two["pattern_ok"] is True


def test_wrong_background_scores_background_0():
    scores = scoring.score_image(_image(background="blue"), "a red cross on a green background")
    assert scores["background_ok"] is False and scores["colour_ok"] is True


@pytest.mark.parametrize("drawn,asked", list(itertools.permutations(SHAPES, 2)))
def test_another_class_scores_class_0(drawn, asked):
    scores = scoring.score_image(_image(shape=drawn), f"a red {asked} on a blue background")
    assert scores["class_ok"] is False and scores["colour_ok"] is True and scores["background_ok"] is True


def test_plain_render_scores_pattern_0_against_a_striped_prompt_and_vice_versa():
    plain = scoring.score_image(_image(colour="red"), "a red and white striped cross on a blue background")
    assert plain["pattern"] == "plain" and plain["pattern_ok"] is False and plain["colour_ok"] is False
    striped = scoring.score_image(_image(pattern="striped", colour2="white"), "a red cross on a blue background")
    assert striped["pattern"] == "striped" and striped["pattern_ok"] is False
    halves = scoring.score_image(_image(pattern="halves", colour2="white"), "a red and white striped cross")
    assert halves["pattern"] == "halves" and halves["pattern_ok"] is False and halves["colour_ok"] is True


def test_no_object_reads_as_absent_and_fails_every_object_attribute():
    blank = np.zeros((32, 32, 3), np.uint8)
    scores = scoring.score_image(blank, "a red cross on a black background")
    assert scores["object_present"] is False and scores["background_ok"] is True
    assert not (scores["class_ok"] or scores["colour_ok"] or scores["pattern_ok"])


def test_subject_photos_score_subject_fidelity_1_and_near_misses_0():
    photos = world.subject_photos(n=8, seed=2)
    assert scoring.subject_fidelity(photos) == 1.0
    assert {s.background for s in world.subject_scenes(n=8, seed=2)} == set(SUBJECT.photo_backgrounds)
    near_misses = [
        _image(colour="red"),  # plain cross
        _image(shape="square", pattern="striped", colour2="white"),  # the stripes on another class
        _image(pattern="halves", colour2="white"),  # the colours in another pattern
        _image(pattern="striped", colour="blue", colour2="white", background="green"),  # another pair
    ]
    assert scoring.subject_fidelity(near_misses) == 0.0
    assert scoring.subject_fidelity(photos[:3] + near_misses) == 3 / 7
    assert scoring.subject_fidelity([_image(pattern="striped", colour="white", colour2="red")]) == 1.0


def test_pretraining_never_shows_the_subject_but_shows_its_parts():
    scenes = world.pretraining_scenes(4000, seed=0)
    assert not any(SUBJECT.matches(s) for s in scenes)
    assert any(s.shape == "cross" and s.pattern == "striped" for s in scenes)
    assert any(s.pattern == "striped" and {s.colour, s.colour2} == {"red", "white"} for s in scenes)
    assert {s.pattern for s in scenes} == set(PATTERNS) and {s.shape for s in scenes} == set(SHAPES)
    assert all(s.background not in (s.colour, s.colour2) and s.colour != s.colour2 for s in scenes)
    assert SUBJECT.matches(world.subject_scenes(1)[0])


def test_parse_prompt_round_trips_every_caption():
    for shape, background, colour, colour2 in itertools.product(SHAPES, COLOURS, COLOURS, COLOURS):
        if len({background, colour, colour2}) < 3:
            continue
        for pattern in PATTERNS:
            second = None if pattern == "plain" else colour2
            scene = Scene(shape, colour, background, pattern, second)
            assert parse_prompt(scene.caption()) == {"shape": shape, "colour": colour, "colour2": second,
                                                     "pattern": pattern, "background": background,
                                                     "identifier": None}, scene.caption()


def test_short_captions_leave_out_the_look_the_setting_or_both_and_parse_as_such():
    """What the base model learns partial prompts from: each short form asks for exactly what it names."""
    for pattern, second in (("plain", None), ("striped", "white"), ("halves", "white")):
        scene = Scene("cross", "red", "blue", pattern, second)
        alone, look, setting = scene.short_captions()
        assert alone == f"a {scene.shape}" and setting == f"a {scene.shape} on a blue background"
        assert look == scene.caption().split(" on a ")[0]
        asked = {key: parse_prompt(alone)[key] for key in ("shape", "colour", "pattern", "background")}
        assert asked == {"shape": scene.shape, "colour": None, "pattern": None, "background": None}
        assert parse_prompt(look)["pattern"] == pattern and parse_prompt(look)["background"] is None
        assert parse_prompt(setting)["background"] == "blue" and parse_prompt(setting)["colour"] is None


def test_parse_prompt_tolerates_an_identifier():
    assert parse_prompt("a sks cross on a green background") == {
        "shape": "cross", "colour": None, "colour2": None, "pattern": None, "background": "green",
        "identifier": "sks"}
    assert parse_prompt("A photo of sks cross")["identifier"] == "sks"
    assert parse_prompt(SUBJECT.instance_prompt())["shape"] == SUBJECT.shape


def test_prompt_fidelity_counts_every_asked_attribute():
    on = {bg: _image(pattern="striped", colour2="white", background=bg) for bg in ("green", "black")}
    prompts = ["a sks cross on a green background"] * 2
    assert scoring.prompt_fidelity([on["green"], on["black"]], prompts) == 0.5
    rates = scoring.attribute_rates([on["green"], on["black"], _image(shape="circle", background="yellow")],
                                    prompts + ["a red cross on a yellow background"])
    assert rates["background_ok"] == pytest.approx(2 / 3) and rates["class_ok"] == pytest.approx(2 / 3)
    assert rates["colour_ok"] == 1.0 and rates["all"] == pytest.approx(1 / 3)


def test_class_preservation_and_language_drift_on_hand_made_cases():
    images = [
        _image(colour="blue", background="green"),  # kept: plain blue cross
        _image(colour="red", pattern="striped", colour2="white", background="green"),  # drifted to the subject
        _image(shape="circle", colour="blue", background="green"),  # lost the class
        _image(colour="red", pattern="striped", colour2="white", background="yellow"),  # skipped: sks prompt
    ]
    prompts = ["a blue cross on a green background"] * 3 + ["a sks cross on a yellow background"]
    assert scoring.class_preservation(images, prompts) == pytest.approx(1 / 3)
    assert scoring.language_drift(images, prompts) == pytest.approx(2 / 3)
    assert np.isnan(scoring.class_preservation(images[3:], prompts[3:]))


def test_background_leakage_counts_exactly_on_hand_made_cases():
    subject = {"pattern": "striped", "colour2": "white"}
    images = [
        _image(background="black", **subject),  # asked green, got an instance background: leak
        _image(background="green", **subject),  # asked green, got green
        _image(background="blue", **subject),  # asked yellow, got an instance background: leak
        _image(background="magenta", **subject),  # asked yellow, got another wrong one: not leakage
        _image(background="black", **subject),  # asked black, an instance background: skipped
        _image(background="blue", **subject),  # no background asked: skipped
    ]
    prompts = ["a sks cross on a green background"] * 2 + ["a sks cross on a yellow background"] * 2 + \
        ["a sks cross on a black background", "a sks cross"]
    assert scoring.background_leakage(images, prompts, SUBJECT.photo_backgrounds) == 0.5
    assert scoring.background_leakage(images[1:2], prompts[1:2], ("black", "blue")) == 0.0
    assert np.isnan(scoring.background_leakage(images[4:], prompts[4:], ("black", "blue")))
    assert set(SUBJECT.prompt_backgrounds()) == {"green", "yellow", "cyan", "magenta"}


@pytest.mark.parametrize("bad", [dict(shape="hexagon"), dict(colour="teal"), dict(pattern="striped"),
                                 dict(colour2="white")])
def test_scene_refuses_what_the_world_cannot_draw(bad):
    with pytest.raises(ValueError):
        Scene(**{"shape": "cross", "colour": "red", "background": "blue", **bad})
