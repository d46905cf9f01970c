"""The toy world's personalisation scores (`ppdreambooth.evaluation.world`) against renders whose truth is known,
and their use in `evaluate --world` and in training (`--eval_world`)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers.runs import run_module, train_argv
from ppdreambooth.evaluation.world import WorldScorer, format_world_table, world_prompts, world_subject
from ppdreambooth.errors import ConfigError
from ppdreambooth.toyworld import SUBJECT, Scene, parse_prompt, render, subject_photos


def photos():
    return [Image.fromarray(p) for p in subject_photos(5, size=32, seed=0)]


def rendered(prompt, subject_shown=True, background=None, colour=None):
    """A render of what `prompt` asks for: the subject (or a plain cross) on the prompted background; `background`
    and `colour` override what is drawn."""
    asked = parse_prompt(prompt)
    background = background or asked["background"]
    if asked["identifier"] and subject_shown:
        scene = Scene("cross", "red", background, "striped", "white", (0.5, 0.5), 0.35)
    else:
        scene = Scene("cross", colour or asked["colour"] or "blue", background, "plain", None, (0.5, 0.5), 0.35)
    return Image.fromarray(render(scene, 32)[0])


def test_perfect_renders_score_one_and_wrong_ones_zero():
    scorer = WorldScorer(photos(), SUBJECT)
    assert scorer.instance_backgrounds == ["black", "blue"]
    subject_prompts, class_prompts = world_prompts(SUBJECT)
    assert subject_prompts[0] == "a sks cross on a green background" and len(class_prompts) == 8
    prompts = subject_prompts + class_prompts
    perfect = scorer.score([[rendered(p)] * 2 for p in prompts], prompts)["overall"]
    assert perfect == {"subject_fidelity": 1.0, "prompt_fidelity": 1.0, "language_drift": 0.0,
                       "background_leakage": 0.0}
    # the subject drawn everywhere, on a photo's background: class prompts drift, subject prompts leak
    leaked = scorer.score([[rendered(p, background="black")] for p in subject_prompts]
                          + [[rendered(subject_prompts[0], background=parse_prompt(p)["background"])]
                             for p in class_prompts], prompts)["overall"]
    assert leaked == {"subject_fidelity": 1.0, "prompt_fidelity": 0.0, "language_drift": 1.0,
                      "background_leakage": 1.0}
    # a plain cross where the subject is asked for; class crosses in the wrong colour
    plain = scorer.score([[rendered(p, subject_shown=False, colour="blue")] for p in subject_prompts]
                         + [[rendered(p, colour="magenta")] for p in class_prompts], prompts)["overall"]
    assert plain["subject_fidelity"] == 0.0 and plain["prompt_fidelity"] == 1.0
    assert plain["language_drift"] == 1.0 and plain["background_leakage"] == 0.0


def test_the_table_and_the_subject_check():
    table = format_world_table({"trained": {"subject_fidelity": 0.75, "prompt_fidelity": 0.5, "language_drift": 0.25,
                                            "background_leakage": 0.0},
                                "base": {"subject_fidelity": 0.0, "prompt_fidelity": 1.0, "language_drift": 0.0,
                                         "background_leakage": 0.0}}, images=2, prompts=12)
    assert "subject fidelity          0.750    0.000   +0.750   subject prompts showing the subject" in table
    assert world_subject("zwx", "circle").instance_prompt() == "a zwx circle"
    with pytest.raises(ConfigError, match="its class must be one of circle, square, triangle, cross, not 'dog'"):
        world_subject("sks", "dog")


@pytest.mark.slow
def test_world_scores_during_training_and_in_evaluate(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(photos()):
        photo.resize((64, 64), Image.NEAREST).save(folder / f"cross-{i}.png")
    out = tmp_path / "out"
    argv = train_argv(tiny_model, str(folder), out, steps=2, extra=["--eval_world", "--evaluate_at_end",
                                                                     "--eval_images_per_prompt", "1",
                                                                     "--validation_inference_steps", "2"])
    argv[argv.index("--instance_prompt") + 1] = "a sks cross"
    trained = run_module(["-m", "ppdreambooth.train", *argv])
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((out / "fidelity.json").read_text())["records"][-1]
    assert set(record) == {"step", "subject_fidelity", "prompt_fidelity", "language_drift", "background_leakage"}
    assert os.path.isfile(out / "fidelity.png")
    scored = run_module(["-m", "ppdreambooth.evaluate", "--world", "--model", str(out), "--instance_data_dir",
                         str(folder), "--num_images", "1", "--steps", "2", "--out", str(tmp_path / "eval"), "--quiet"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "Toy-world personalisation over 12 prompts x 1 images" in scored.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"trained", "base"} and all(0.0 <= v <= 1.0 for v in metrics["trained"].values())
    refused = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, str(folder), tmp_path / "dog",
                                                                   extra=["--eval_world", "--evaluate_at_end"])])
    assert refused.returncode == 2 and "its class must be one of" in refused.stderr
    assert np.asarray(Image.open(folder / "cross-0.png")).shape == (64, 64, 3)
