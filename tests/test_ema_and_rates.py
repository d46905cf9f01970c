"""EMA (formula, checkpoint, resume, output) and the text encoder's own learning rate and stop step."""
import os
import shutil

import numpy as np
import paddle
import pytest

from helpers.models import load_unet_weights
from helpers.runs import run_module, train_argv
from helpers.models import make_model as make
from ppdreambooth.modeling.ema import EMA_STATE_NAME, WeightEMA


def test_ema_equals_its_formula(tiny_model):
    model = make(tiny_model)
    ema = WeightEMA(model, decay=0.9)
    name, param = model.trainable_named_parameters()[0]
    expected = param.numpy().astype(np.float64)
    rng = np.random.RandomState(0)
    for n in range(6):
        param.set_value(rng.standard_normal(param.shape).astype("float32"))
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * param.numpy()
    np.testing.assert_allclose(ema.shadow[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ema.shadow[name].dtype == paddle.float32 and ema.num_updates == 6
    model.to(dtype="bfloat16")  # AMP O2 would cast the model: the average is not part of it
    assert ema.shadow[name].dtype == paddle.float32
    before = param.numpy().copy()
    with ema.swapped_in():
        assert np.allclose(param.astype("float32").numpy(), ema.shadow[name].numpy(), atol=1e-2)
    assert np.array_equal(param.numpy(), before)


def test_text_encoder_learning_rate_applies_only_to_the_text_encoder(tiny_model):
    model = make(tiny_model, train_text_encoder=True)
    model.set_text_encoder_learning_rate(1e-3, 3e-3)
    te_ids = {id(p) for p in model.text_encoder_parameters()}
    assert te_ids and all(p.optimize_attr["learning_rate"] == pytest.approx(3.0)
                          for p in model.trainable_parameters() if id(p) in te_ids)
    # one parameter list (global-norm clipping spans all of it); the rate rides on each parameter
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.trainable_parameters(), weight_decay=0.0)
    before = {n: p.numpy().copy() for n, p in model.trainable_named_parameters()}
    paddle.seed(0)
    model.train()
    model(pixel_values=paddle.uniform([2, 3, 64, 64], min=-1, max=1),
          input_ids=paddle.randint(0, 500, [2, 77]))["loss"].backward()
    optimizer.step()
    # Adam's first step moves every weight with a gradient by about its learning rate
    steps = {n: np.abs(p.numpy() - before[n]).max() for n, p in model.trainable_named_parameters()}
    te_step = max(v for n, v in steps.items() if n.startswith("text_encoder."))
    unet_step = max(v for n, v in steps.items() if n.startswith("unet."))
    assert te_step == pytest.approx(3e-3, rel=0.05) and unet_step == pytest.approx(1e-3, rel=0.05)


def _te(state):
    return {k: v.numpy() for k, v in state.items() if k.startswith("text_encoder.")}


@pytest.mark.slow
def test_stop_text_encoder_training_freezes_it_from_that_step(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=4, extra=[
        "--train_text_encoder", "--stop_text_encoder_training", "2", "--checkpointing_steps", "1",
        "--text_encoder_learning_rate", "1e-3"])])
    assert result.returncode == 0, result.stderr[-3000:]
    te = {s: _te(paddle.load(str(out / f"checkpoint-{s}" / "model_state.pdparams"))) for s in (1, 2, 3, 4)}
    unet = {s: paddle.load(str(out / f"checkpoint-{s}" / "model_state.pdparams"))["unet.conv_in.weight"].numpy()
            for s in (2, 4)}
    assert any(not np.array_equal(te[1][k], te[2][k]) for k in te[1])  # trained up to step 2
    for s in (3, 4):
        assert all(np.array_equal(te[2][k], te[s][k]) for k in te[2])  # frozen afterwards
    assert not np.array_equal(unet[2], unet[4])  # the UNet keeps training


@pytest.mark.slow
def test_ema_is_checkpointed_restored_and_written(tiny_model, photos, tmp_path):
    extra = ["--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2", "--random_flip"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=4, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    ema = paddle.load(str(full / "checkpoint-4" / EMA_STATE_NAME), return_numpy=True)
    raw = paddle.load(str(full / "checkpoint-4" / "model_state.pdparams"))
    output = load_unet_weights(str(full))
    assert ema["num_updates"] == 4
    assert np.array_equal(output["conv_in.weight"], ema["shadow"]["unet.conv_in.weight"])  # the output is the EMA
    assert not np.array_equal(output["conv_in.weight"], raw["unet.conv_in.weight"].numpy())

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in os.listdir(resumed):
        if name not in ("checkpoint-2", "logs"):
            path = resumed / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, resumed, steps=4, extra=extra + [
        "--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_unet_weights(str(resumed))
    for k in output:
        assert np.array_equal(again[k], output[k]), k
