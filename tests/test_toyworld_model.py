"""The toy-world model builder (`python -m ppdreambooth.toyworld.pretrain`) and the model it built, which ships in
the package: the tokenizer keeps every world word and `sks` whole; a short build runs end to end, writes a loadable
SD 1.x folder whose card records the weights' sha256, and gives the same weights when run again with the same seed;
the shipped folder's files are the ones its card names; the demo trains on it and scores it, end to end."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_tokenizer_builder_keeps_any_word_list_whole():
    """The merge-growing loop must work for words whose merges collide ('r e' of red inside green)."""
    from ppdreambooth.toyworld.tokenizer import apply_merges, grow_merges

    words = ["red", "green", "greener", "reed", "ere", "sks", "a", "aa", "aaa"]
    ranks = {pair: i for i, pair in enumerate(grow_merges(words))}
    assert all(len(apply_merges(word, ranks)) == 1 for word in words)


def _build(out):
    command = [sys.executable, "-m", "ppdreambooth.toyworld.pretrain", "--out", str(out), "--seed", "0",
               "--images", "64", "--vae_steps", "2", "--unet_steps", "2", "--eval_prompts", "2",
               "--eval_images_per_prompt", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_short_build_runs_end_to_end_and_repeats_exactly(tmp_path):
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.toyworld.assemble import weight_digests
    from ppdreambooth.toyworld.model_card import card_digests
    from ppdreambooth.toyworld.tokenizer import MODEL_MAX_LENGTH, single_token_words

    first, second = tmp_path / "a", tmp_path / "b"
    _build(first)
    _build(second)
    for part in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "model_index.json", "MODEL_CARD.md"):
        assert (first / part).exists(), part
    card = (first / "MODEL_CARD.md").read_text()
    assert "--vae_steps 2" in card and "Held-out evaluation" in card
    recorded = card_digests(str(first))
    assert recorded and recorded == {path: entry["sha256"] for path, entry in weight_digests(str(first)).items()}
    assert card_digests(str(second)) == recorded  # same seed, same weights
    with paddle.utils.unique_name.guard():
        pipeline = StableDiffusionPipeline.from_pretrained(str(first), safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    assert pipeline.vae_scale_factor == 4 and pipeline.unet.config.sample_size * 4 == 32
    assert pipeline.scheduler.config.clip_sample is False
    assert all(single_token_words(pipeline.tokenizer).values())
    assert pipeline.tokenizer.model_max_length == MODEL_MAX_LENGTH == 16


def test_pretraining_shortens_the_share_of_captions_its_recipe_gives_and_only_with_short_forms():
    from dataclasses import replace

    import numpy as np

    from ppdreambooth.toyworld.denoiser import DenoiserRecipe, LatentSet, draw_batch, noise_schedule_alphas

    n, length = 6, 4
    ids = np.arange(n * length).reshape(n, length)
    short = 1000 + np.arange(n * 3 * length).reshape(n, 3, length)
    data = LatentSet(np.zeros((n, 4, 2, 2)), np.zeros((n, 4, 2, 2)), ids, np.full(length, -1), short)
    recipe = replace(DenoiserRecipe(), batch_size=4000, short_caption_share=0.25, empty_caption_share=0.1)
    drawn = draw_batch(data, np.random.default_rng(0), recipe, noise_schedule_alphas())[2]
    full = np.array([any((row == ids).all(axis=1)) for row in drawn])
    shortened = np.array([any((row == short.reshape(-1, length)).all(axis=1)) for row in drawn])
    empty = (drawn == -1).all(axis=1)
    assert (full ^ shortened ^ empty).all()  # every caption is exactly one of the three
    assert abs(empty.mean() - 0.1) < 0.02 and abs(shortened.mean() - 0.9 * 0.25) < 0.03
    none = replace(recipe, short_caption_share=0.0)
    assert not any(any((row == short.reshape(-1, length)).all(axis=1))
                   for row in draw_batch(data, np.random.default_rng(0), none, noise_schedule_alphas())[2])


@pytest.mark.parametrize("flag", ["--vae_steps", "--unet_steps", "--images", "--eval_prompts"])
def test_the_builder_refuses_a_count_below_one_before_building(flag, tmp_path, capsys):
    from ppdreambooth.toyworld.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "sd"), flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "sd").exists()


def test_the_shipped_model_is_the_one_its_card_describes():
    from ppdreambooth.demo import TOY_MODEL
    from ppdreambooth.toyworld.assemble import weight_digests
    from ppdreambooth.toyworld.model_card import card_digests

    recorded = card_digests(TOY_MODEL)
    assert len(recorded) == 3  # vae, text encoder, unet
    assert recorded == {path: entry["sha256"] for path, entry in weight_digests(TOY_MODEL).items()}
    card = open(os.path.join(TOY_MODEL, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "python -m ppdreambooth.toyworld.pretrain --out" in card and "Held-out evaluation" in card


def test_the_shipped_model_loads_as_a_stable_diffusion_pipeline_of_the_world():
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.demo import TOY_MODEL
    from ppdreambooth.families import detect_family
    from ppdreambooth.toyworld.tokenizer import single_token_words

    assert detect_family(TOY_MODEL).name == "sd"
    with paddle.utils.unique_name.guard():
        pipeline = StableDiffusionPipeline.from_pretrained(TOY_MODEL, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    assert pipeline.vae_scale_factor == 4 and pipeline.unet.config.sample_size == 8
    assert all(single_token_words(pipeline.tokenizer).values())  # "sks" and every world word: one token each


@pytest.mark.slow
def test_the_demo_trains_on_the_toy_model_and_scores_before_and_after(tmp_path):
    out, classes = tmp_path / "out", tmp_path / "class"
    command = [sys.executable, "-m", "ppdreambooth.demo", "--images_per_prompt", "1", "--output_dir", str(out),
               "--class_data_dir", str(classes), "--num_class_images", "2", "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--report_to", "none"]
    result = subprocess.run(command, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("subject fidelity", "prompt fidelity", "language drift", "background leakage"):
        assert label in result.stdout, result.stdout[-2000:]
    assert "Demo finished" in result.stdout
    assert (out / "model_index.json").is_file() and len(os.listdir(classes)) == 2
    assert len(os.listdir(out / "samples")) == 5
    assert (out / "evaluation" / "metrics.json").is_file()
