"""DoRA (`--lora_type dora`): the layer against a NumPy transcription of W' = m (W + sBA) / ||W + sBA|| with the norm
per output feature (axis 0 of Paddle's [in, out] weight), the norm detached in the backward pass, every family
equal to its base model at initialisation, magnitudes trained and base weights frozen, the merged export, the
kohya layout, diffusers loading the export (PyTorch client), exact resume, and bad flags refused."""
import json
import os

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.models import collate, make_model
from helpers.runs import client, run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
from ppdreambooth.data.images import list_image_files
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.errors import ConfigError
from ppdreambooth.interop.exports import export, lora_to_diffusers, lora_to_kohya
from ppdreambooth.interop.merge import dora_weight, write_merged
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, MAGNITUDE, add_lora, save_lora_weights, to_peft_keys


# ----- the layer -----------------------------------------------------------------------------------------------
class Block(paddle.nn.Layer):
    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.proj = paddle.nn.Linear(fan_in, fan_out)
        self.conv = paddle.nn.Conv2D(3, 4, 3)

    def forward(self, x):
        return self.proj(x)


def dora_block(fan_in=7, fan_out=5, rank=3, alpha=6.0, seed=0):
    """A Linear(fan_in, fan_out) with DoRA adapters whose A, B and magnitude are random (B non-zero), and the
    NumPy arrays of its weights (Paddle layout: W [in, out], A [in, r], B [r, out], m [out], bias [out])."""
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        block = Block(fan_in, fan_out)
        add_lora(block, ["proj"], rank, alpha, "dora")
    rng = np.random.RandomState(seed)
    layer = block.proj
    arrays = {"W": layer.base_layer.weight.numpy(), "b": rng.standard_normal(fan_out).astype("float32"),
              "A": rng.standard_normal((fan_in, rank)).astype("float32"),
              "B": rng.standard_normal((rank, fan_out)).astype("float32") * 0.3}
    arrays["m"] = (np.linalg.norm(arrays["W"], axis=0) * rng.uniform(0.5, 1.5, fan_out)).astype("float32")
    with paddle.no_grad():
        layer.base_layer.bias.set_value(arrays["b"])
        layer.lora_A["default"].weight.set_value(arrays["A"])
        layer.lora_B["default"].weight.set_value(arrays["B"])
        getattr(layer, MAGNITUDE)["default"].set_value(arrays["m"])
    return block, arrays, alpha / rank


def numpy_dora(x, a, s):
    """The formula in PyTorch's layout, as PEFT writes it: W_t = W.T [out, in], the norm over each row (dim 1)."""
    weight_t = (a["W"] + s * a["A"] @ a["B"]).T.astype(np.float64)
    norms = np.linalg.norm(weight_t, axis=1)  # one per output feature
    return x.astype(np.float64) @ (a["m"][:, None] * weight_t / norms[:, None]).T + a["b"]


def test_the_layer_computes_the_dora_weight_with_a_norm_per_output_feature():
    block, a, s = dora_block(fan_in=7, fan_out=5, rank=3, alpha=6.0)  # alpha != rank: the scale is applied
    x = np.random.RandomState(1).standard_normal((4, 7)).astype("float32")
    got = block(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, numpy_dora(x, a, s), rtol=1e-5, atol=1e-5)
    # the same as the Paddle-layout transcription the merged export uses (norm over axis 0 of [in, out])
    np.testing.assert_allclose(got, x @ dora_weight(a["W"], a["A"], s * a["B"], a["m"]) + a["b"], rtol=1e-5, atol=1e-5)
    # a norm per input feature (the other axis) would be another layer: checked on a square one
    square, q, sq = dora_block(fan_in=6, fan_out=6, rank=2, alpha=2.0, seed=3)
    x6 = np.random.RandomState(2).standard_normal((4, 6)).astype("float32")
    merged = q["W"] + sq * q["A"] @ q["B"]
    per_input = merged * (q["m"][:, None] / np.linalg.norm(merged, axis=1)[:, None])  # [in, out]: axis 1 is per input
    out = square(paddle.to_tensor(x6)).numpy()
    np.testing.assert_allclose(out, numpy_dora(x6, q, sq), rtol=1e-5, atol=1e-5)
    assert np.abs(out - (x6 @ per_input + q["b"])).max() > 1e-2


def test_switched_off_adapters_give_the_base_layer_exactly():
    block, a, _ = dora_block()
    x = paddle.to_tensor(np.random.RandomState(1).standard_normal((4, 7)).astype("float32"))
    base = block.proj.base_layer(x).numpy()
    block.proj.enable_adapters(False)
    assert np.array_equal(block(x).numpy(), base)
    block.proj.enable_adapters(True)
    assert np.abs(block(x).numpy() - base).max() > 1e-2


def test_at_initialisation_the_layer_is_the_base_layer_bit_for_bit():
    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        block = Block(7, 5)
        add_lora(block, ["proj"], 3, 6.0, "dora")
    layer = block.proj
    np.testing.assert_allclose(getattr(layer, MAGNITUDE)["default"].numpy(),  # the base weight's norm per output
                               np.linalg.norm(layer.base_layer.weight.numpy().astype(np.float64), axis=0), rtol=1e-6)
    assert not getattr(layer, MAGNITUDE)["default"].stop_gradient and layer.base_layer.weight.stop_gradient
    x = paddle.randn([4, 7])
    assert np.array_equal(block(x).numpy(), layer.base_layer(x).numpy())


def numpy_gradients(x, g, a, s):
    """d(sum(y * g))/d(A, B, m) with y = x V (m / n) + b, V = W + s A B, and n = ||V|| per output feature held
    constant (detached, as PEFT does)."""
    v = a["W"] + s * a["A"] @ a["B"]
    n = np.linalg.norm(v, axis=0)
    dv = x.T @ (g * (a["m"] / n))
    return {"A": s * dv @ a["B"].T, "B": s * a["A"].T @ dv, "m": ((x @ v) * g).sum(0) / n}


def test_the_gradient_treats_the_norm_as_a_constant():
    block, a, s = dora_block()
    a = {k: v.astype(np.float64) for k, v in a.items()}
    rng = np.random.RandomState(5)
    x, g = rng.standard_normal((4, 7)), rng.standard_normal((4, 5))
    layer = block.proj
    params = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
              "m": getattr(layer, MAGNITUDE)["default"]}
    (block(paddle.to_tensor(x, dtype="float32")) * paddle.to_tensor(g, dtype="float32")).sum().backward()
    want = numpy_gradients(x, g, a, s)
    for name, param in params.items():
        np.testing.assert_allclose(param.grad.numpy(), want[name], rtol=1e-4, atol=1e-5, err_msg=name)

    # finite differences of the loss with the norm frozen at its current value agree; with the norm following B
    # (not detached) they do not: the test would catch a norm that is differentiated
    def loss(b_matrix, frozen_norm):
        v = a["W"] + s * a["A"] @ b_matrix
        n = np.linalg.norm(a["W"] + s * a["A"] @ a["B"], axis=0) if frozen_norm else np.linalg.norm(v, axis=0)
        return float(((x @ v * (a["m"] / n) + a["b"]) * g).sum())

    eps, (i, j) = 1e-6, (1, 2)
    bumped = a["B"].copy()
    bumped[i, j] += eps
    frozen = (loss(bumped, True) - loss(a["B"], True)) / eps
    followed = (loss(bumped, False) - loss(a["B"], False)) / eps
    assert abs(params["B"].grad.numpy()[i, j] - frozen) < 1e-3 * max(1.0, abs(frozen))
    assert abs(frozen - followed) > 1e-2


def test_dora_on_a_convolution_is_refused():
    with paddle.utils.unique_name.guard(), pytest.raises(ConfigError, match="Linear layers only; conv is a Conv2D"):
        add_lora(Block(7, 5), ["conv"], 2, 2.0, "dora")


# ----- every family ------------------------------------------------------------------------------------------
TEXT_ENCODERS = {"sd": True, "sdxl": True, "sd3": False}  # SD3 LoRA trains the transformer only


def dataset_of(model, photos):
    files = list_image_files(photos)
    instance = load_image_set(files, "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    prior = load_image_set(files[::-1], "a photo of dog", model.tokenize, lambda h, w: (64, 64))
    return DreamBoothDataset([ConceptData(instance, prior)], center_crop=True, random_flip=False,
                             size_conditioning=model.family.size_conditioning)


def loss_of(model, batch):
    paddle.seed(11)
    with paddle.no_grad():
        return model(**batch)["loss"].numpy()


def switch_adapters(model, on: bool):
    from ppdiffusers.peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.trained_layers().values():
        for sub in layer.sublayers():
            if isinstance(sub, BaseTunerLayer):
                sub.enable_adapters(on)


def frozen_weights(model):
    return {f"{c}.{k}": v.numpy().copy() for c, layer in model.trained_layers().items()
            for k, v in layer.state_dict().items() if "lora_" not in k}


@pytest.mark.slow  # builds three models per family
def test_every_family_starts_as_its_base_trains_magnitudes_and_merges(family_model, photos, tmp_path):
    family, path = family_model
    text = TEXT_ENCODERS[family]
    base = make_model(path, prior=True)
    model = make_model(path, prior=True, use_lora=True, lora_type="dora", lora_rank=4, lora_alpha=8.0,
                       train_text_encoder=text)
    dataset = dataset_of(model, photos)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))  # the base model, bit for bit

    magnitudes = {n: p.numpy().copy() for n, p in model.trainable_named_parameters() if MAGNITUDE in n}
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.trainable_named_parameters()}
    assert magnitudes and {n.rsplit(".lora_", 1)[0] for n in magnitudes} == adapted  # one per adapted layer
    assert {n.split(".")[0] for n in magnitudes} == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                                     else {"unet", "text_encoder"} if family == "sd"
                                                     else {"transformer"})
    before = frozen_weights(model)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.trainable_parameters())
    model.train()
    for step in range(3):
        paddle.seed(step)
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    after = dict(model.trainable_named_parameters())
    moved = [n for n in magnitudes if n in after and not np.array_equal(after[n].numpy(), magnitudes[n])]
    # The last layer of SDXL's first text encoder keeps its magnitudes: SDXL reads its penultimate hidden states.
    # (SD3's last block never uses its context queries: that adapter, magnitude included, is frozen, not trained.)
    unused = {"sdxl": ("text_encoder.text_model.encoder.layers.4.",)}.get(family, ())
    if family == "sd3":
        last = model.denoiser.transformer_blocks[-1].attn.add_q_proj
        assert getattr(last, MAGNITUDE)["default"].stop_gradient
    assert set(magnitudes) - set(moved) == {n for n in magnitudes if any(u in n for u in unused)}
    assert len(moved) > 0.9 * len(magnitudes)
    now = frozen_weights(model)
    assert all(np.array_equal(now[k], before[k]) for k in before)  # base weights frozen
    trained = loss_of(model, batch)
    assert abs(float(trained) - float(loss_of(base, batch))) > 1e-6
    switch_adapters(model, False)  # adapters off: the base model again, exactly
    assert np.array_equal(loss_of(model, batch), loss_of(base, batch))
    switch_adapters(model, True)

    # the saved file holds a magnitude per adapted module; folded into the base weights it is the trained model
    saved = load_file(save_lora_weights(str(tmp_path), model.family, model.trained_layers(), 4, 8.0))
    modules = {k.rsplit(".lora", 1)[0] for k in to_peft_keys(saved) if k.endswith(".lora_A.weight")}
    assert {k[:-len("." + MAGNITUDE)] for k in saved if k.endswith("." + MAGNITUDE)} == modules
    write_merged(to_peft_keys(saved), path, model.family, str(tmp_path / "merged"))
    merged = make_model(str(tmp_path / "merged"), prior=True)
    np.testing.assert_allclose(loss_of(merged, batch), trained, rtol=1e-5)


@pytest.mark.slow
def test_the_base_prediction_prior_runs_with_dora(tiny_model, photos):
    """The prior target is the DoRA model with its adapters off: the base model's prediction."""
    model = make_model(tiny_model, prior=True, use_lora=True, lora_type="dora")
    model.base_prediction_prior = True
    dataset = dataset_of(model, photos)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    out = model(**batch)
    assert float(out["loss_prior"]) == 0.0  # at initialisation the model is its base: the prior target exactly
