"""Fidelity metrics during training: scored at every K-th checkpoint and at the end, logged and plotted,
without changing training."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import paddle
from PIL import Image

from ppdreambooth.config.arguments import ModelArguments
from helpers.tiny_metrics import write_tiny_clip, write_tiny_dino
from ppdreambooth.evaluation.dino import load_dino
from ppdreambooth.evaluation.fidelity import FidelityScorer, load_clip
from ppdreambooth.evaluation.prompts import subject_words
from ppdreambooth.training.fidelity_callback import FidelityCallback
from ppdreambooth.data.images import list_image_files
from ppdreambooth.modeling.build import build_model


def test_subject_words_from_the_instance_prompt():
    assert subject_words("a photo of sks dog", None) == ("sks", "dog")
    assert subject_words("a photo of zwx cat, smiling", "cat") == ("zwx", "cat")


def test_scored_every_k_checkpoints_and_at_the_end(tiny_model, photos, tmp_path):
    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model))
    scorer = FidelityScorer(load_clip(write_tiny_clip(str(tmp_path / "clip"))),
                            load_dino(write_tiny_dino(str(tmp_path / "dino"))),
                            [Image.open(p).convert("RGB") for p in list_image_files(photos)])
    callback = FidelityCallback(model, scorer, ["a sks dog on a beach", "a sks dog in a bucket"],
                                num_images=1, every=2, at_end=True, inference_steps=2)
    args = SimpleNamespace(should_save=True, output_dir=str(tmp_path), seed=0, report_to=[])
    model.train()
    paddle.seed(9)
    expected_draw = paddle.randn([3]).numpy()
    paddle.seed(9)
    for step in (2, 4, 6):
        callback.on_save(args, SimpleNamespace(global_step=step), None)
    assert model.training and np.array_equal(paddle.randn([3]).numpy(), expected_draw)  # RNG untouched
    callback.on_train_end(args, SimpleNamespace(global_step=6), None)
    records = json.loads((tmp_path / "fidelity.json").read_text())["records"]
    assert [r["step"] for r in records] == [4, 6]  # the 2nd save, then the end (the 3rd save is not due)
    assert all(-1 <= r[k] <= 1 for r in records for k in ("dino", "clip_i", "clip_t"))
    assert records[0] == {**records[0], **{k: records[1][k] for k in ("dino", "clip_i", "clip_t")}}  # same weights
    assert Image.open(tmp_path / "fidelity.png").size[0] > 100


@pytest.mark.slow
def test_training_with_fidelity_checkpoints(tiny_model, photos, tmp_path):
    from helpers.runs import run_module, train_argv

    out = tmp_path / "out"
    extra = ["--checkpointing_steps", "2", "--evaluate_every_n_checkpoints", "1", "--evaluate_at_end",
             "--eval_num_prompts", "2", "--eval_images_per_prompt", "1", "--validation_inference_steps", "2",
             "--eval_clip_model", write_tiny_clip(str(tmp_path / "clip")),
             "--eval_dino_model", write_tiny_dino(str(tmp_path / "dino"))]
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=5, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((out / "fidelity.json").read_text())
    assert [r["step"] for r in records["records"]] == [2, 4, 5]  # each checkpoint, then the end
    assert records["prompts"][0].count("sks dog") == 1  # DreamBench templates filled from the instance prompt
    assert (out / "fidelity.png").is_file()
