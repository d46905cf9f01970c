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
from ppdreambooth.interop.merge import dora_weight, load_adapters, write_merged
from ppdreambooth.modeling.dora import add_dora
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, MAGNITUDE, save_lora_weights, to_peft_keys


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
        add_dora(block, ["proj"], rank, alpha)
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
        add_dora(block, ["proj"], 3, 6.0)
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
        add_dora(Block(7, 5), ["conv"], 2, 2.0)


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
    saved = load_file(save_lora_weights(str(tmp_path), model.family, model.trained_layers()))
    modules = {k.rsplit(".lora", 1)[0] for k in to_peft_keys(saved) if k.endswith(".lora_A.weight")}
    assert {k[:-len("." + MAGNITUDE)] for k in saved if k.endswith("." + MAGNITUDE)} == modules
    write_merged(to_peft_keys(saved), path, model.family, str(tmp_path / "merged"))
    merged = make_model(str(tmp_path / "merged"), prior=True)
    np.testing.assert_allclose(loss_of(merged, batch), trained, rtol=1e-5)


def test_the_size_formula_counts_one_magnitude_per_output_feature(tiny_model):
    from ppdreambooth.modeling.lora import lora_parameter_count

    model = make_model(tiny_model, use_lora=True, lora_type="dora", lora_rank=4)
    named = model.trainable_named_parameters()
    config = json.load(open(os.path.join(tiny_model, "unet", "config.json")))
    assert sum(int(p.numel()) for _, p in named) == lora_parameter_count(4, config, dora=True)
    assert sum(int(p.numel()) for n, p in named if MAGNITUDE not in n) == lora_parameter_count(4, config)


@pytest.mark.slow
def test_the_base_prediction_prior_runs_with_dora(tiny_model, photos):
    """The prior target is the DoRA model with its adapters off: the base model's prediction."""
    model = make_model(tiny_model, prior=True, use_lora=True, lora_type="dora")
    model.base_prediction_prior = True
    dataset = dataset_of(model, photos)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    out = model(**batch)
    assert float(out["loss_prior"]) == 0.0  # at initialisation the model is its base: the prior target exactly


# ----- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--lora_type", "dora"], "--lora_type dora is a kind of LoRA adapter; it needs --use_lora"),
    (["--use_lora", "--lora_type", "lycoris"], "invalid choice: 'lycoris' (choose from 'lora', 'dora', 'loha', "
                                                "'lokr')"),
], ids=["without_use_lora", "unknown_type"])
def test_bad_lora_type_flags_stop_before_any_model_loads(extra, message, tiny_model, photos, tmp_path, capsys,
                                                          no_model_loading):
    assert train.main(train_argv(tiny_model, photos, tmp_path / "out", extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_convolution_named_in_lora_layers_is_refused_for_dora(tiny_model):
    with pytest.raises(ConfigError, match="--lora_type dora adapts Linear layers only; .*conv1 is a Conv2D"):
        make_model(tiny_model, use_lora=True, lora_type="dora", lora_layers="to_q,conv1")


DORA_ARGS = ["--lora_type", "dora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
             "--checkpointing_steps", "2", "--train_text_encoder"]


@pytest.mark.slow
def test_a_dora_run_resumes_exactly_and_refuses_to_continue_as_lora(tiny_model, photos, tmp_path):
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train_lora", *train_argv(tiny_model, photos, full, steps=6,
                                                                        extra=DORA_ARGS)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DoRA rank 4 (LoRA + a magnitude per output feature)" in result.stdout
    assert "DoRA: not by ppdiffusers' load_lora_weights" in result.stdout
    card = (full / "README.md").read_text()
    assert "DoRA (rank 4, alpha 8" in card and "ppdiffusers 0.29 cannot load DoRA" in card and "dora]" in card
    settings = json.loads((full / "checkpoint-2" / "run_settings.json").read_text())
    assert settings["lora_type"] == "dora"
    reference = load_file(str(full / LORA_WEIGHTS_NAME))
    assert any(k.endswith("." + MAGNITUDE) for k in reference)
    for step, resume in ((4, "latest"), (2, "checkpoint-2")):
        resumed = tmp_path / f"resumed-{step}"
        truncate_run_to(str(full), step, str(resumed))
        target = resume if resume == "latest" else str(resumed / resume)
        result = run_module(["-m", "ppdreambooth.train_lora", *train_argv(
            tiny_model, photos, resumed, steps=6, extra=DORA_ARGS + ["--resume_from_checkpoint", target])])
        assert result.returncode == 0, result.stderr[-3000:]
        weights = load_file(str(resumed / LORA_WEIGHTS_NAME))
        assert weights.keys() == reference.keys() and all(np.array_equal(weights[k], reference[k]) for k in weights)
    # generate and evaluate fold the run into the pipeline (ppdiffusers cannot load DoRA); --lora_scale weights
    # the change to each weight: 0 is the base model, 1 the merged export
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.families import get_family

    def unet_after(scale):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        assert load_adapters(get_family("sd"), pipe, str(full), scale) == {}
        return {k: v.numpy() for k, v in pipe.unet.state_dict().items()}

    base_unet = {k: v.numpy() for k, v in StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None).unet.state_dict().items()}
    write_merged(to_peft_keys(reference), tiny_model, get_family("sd"), str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_paddle_model.safetensors"))
    zero, one, half = unet_after(0.0), unet_after(None), unet_after(0.5)
    changed = [k for k in base_unet if not np.array_equal(merged[k], base_unet[k])]
    assert changed and all(".to_" in k and k.endswith(".weight") for k in changed)  # the adapted projections
    assert all(np.array_equal(zero[k], base_unet[k]) and np.array_equal(one[k], merged[k]) for k in base_unet)
    np.testing.assert_allclose(half[changed[0]], (base_unet[changed[0]] + merged[changed[0]]) / 2, rtol=1e-5,
                               atol=1e-7)

    # the generate command with the run as --lora draws what the merged folder draws
    from PIL import Image

    images = {}
    for label, model_args in (("lora", ["--model", tiny_model, "--lora", str(full)]),
                              ("merged", ["--model", str(tmp_path / "merged")])):
        result = run_module(["-m", "ppdreambooth.generate", *model_args, "--prompt", "a photo of sks dog",
                             "--num_images", "1", "--steps", "3", "--seed", "5", "--out", str(tmp_path / label)])
        assert result.returncode == 0, result.stderr[-3000:]
        images[label] = np.asarray(Image.open(tmp_path / label / "00-00-a-photo-of-sks-dog-seed5.png"))
    assert np.array_equal(images["lora"], images["merged"])

    as_lora = tmp_path / "as-lora"
    truncate_run_to(str(full), 4, str(as_lora))
    lora_args = [a if a != "dora" else "lora" for a in DORA_ARGS]
    result = run_module(["-m", "ppdreambooth.train_lora", *train_argv(
        tiny_model, photos, as_lora, steps=6, extra=lora_args + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 2 and "--lora_type is lora but checkpoint-4 was trained with dora" in result.stderr


# ----- the PyTorch world: diffusers loads the export; the kohya layout --------------------------------------------
def sd_inputs(tmp_path):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 500, (2, 77)).astype("int64")
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 512, 513, 513  # the tiny vocabulary's start and end tokens
    data = dict(latents=rng.standard_normal((2, 4, 8, 8)).astype("float32"),
                timesteps=np.array([10, 700], dtype="int64"), input_ids=ids,
                time_ids=np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]], dtype="float32"))
    np.savez(tmp_path / "inputs.npz", **data)
    return tmp_path / "inputs.npz", data


def sd_outputs(pipe, data):
    with paddle.no_grad():
        hidden = pipe.text_encoder(paddle.to_tensor(data["input_ids"]))[0]
        pred = pipe.unet(paddle.to_tensor(data["latents"]), paddle.to_tensor(data["timesteps"]), hidden).sample
    return {"hidden": hidden.numpy(), "pred": pred.numpy()}


def sdxl_outputs(pipe, data):
    """The client's `unet_sdxl` outputs, in Paddle, through the family's own conditioning code."""
    family = pipe_family("sdxl")
    ids = paddle.to_tensor(data["input_ids"])
    with paddle.no_grad():
        conditioning = family.encode_prompt({"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
                                            {"input_ids": ids, "input_ids_2": ids})
        conditioning["time_ids"] = paddle.to_tensor(data["time_ids"])
        pred = family.predict(pipe.unet, paddle.to_tensor(data["latents"]), paddle.to_tensor(data["timesteps"]),
                              conditioning)
    return {"hidden": conditioning["prompt_embeds"].numpy(), "pooled": conditioning["pooled_prompt_embeds"].numpy(),
            "pred": pred.numpy()}


def pipe_family(name):
    from ppdreambooth.families import get_family

    return get_family(name)


def relative_errors(got, want, keys):
    return {k: float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in keys}


def dora_run(model, photos, out, family_args=("--train_text_encoder",), formats="diffusers,kohya"):
    argv = train_argv(model, photos, out, steps=2, extra=["--use_lora", "--lora_type", "dora", "--lora_rank", "4",
                                                          "--lora_alpha", "8", *family_args,
                                                          "--export_formats", formats])
    argv[argv.index("--learning_rate") + 1] = "1e-2"  # B starts at zero: move it visibly in two steps
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def lycoris_wd_on_out(weight_t, down, up, alpha, dora_scale):
    """LyCORIS's weight decomposition with `wd_on_out` (a magnitude per output feature), PyTorch layout: W [out, in],
    the LoRA product up @ down * alpha / rank, the norm of each row of the merged weight, times `dora_scale`
    [out, 1]."""
    merged = weight_t.astype(np.float64) + up.astype(np.float64) @ down.astype(np.float64) * (alpha / down.shape[0])
    return merged * dora_scale.astype(np.float64) / np.linalg.norm(merged, axis=1, keepdims=True)


def check_kohya_layout(kohya, base_pipe, folded_pipe, state, name_of):
    """Every adapted module has `dora_scale` [out, 1] beside lora_down/lora_up/alpha, and LyCORIS's wd_on_out formula
    over the base weights gives the folded (merged) weights."""
    from ppdreambooth.interop.merge import adapter_pairs

    pairs = adapter_pairs(state)
    assert sum(k.endswith(".dora_scale") for k in kohya) == len(pairs)
    for (component, module), pair in pairs.items():
        name = name_of(component, module)
        scale = kohya[f"{name}.dora_scale"]
        assert scale.shape == (pair["m"].shape[0], 1)
        base = dict(getattr(base_pipe, component).named_sublayers())[module].weight.numpy()
        folded = dict(getattr(folded_pipe, component).named_sublayers())[module].weight.numpy()
        got = lycoris_wd_on_out(base.T, kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"],
                                float(kohya[f"{name}.alpha"]), scale)
        np.testing.assert_allclose(got, folded.T, rtol=1e-5, atol=1e-6, err_msg=f"{component}.{module}")


@pytest.mark.slow
def test_sd_dora_loads_in_diffusers_and_the_kohya_file_has_lycoris_layout(torch_python, tiny_model, photos, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    from ppdreambooth.interop.keymaps_ldm import sd_kohya_name

    out = dora_run(tiny_model, photos, tmp_path / "dora")
    inputs, data = sd_inputs(tmp_path)
    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base_outputs = sd_outputs(base, data)
    base.save_pretrained(str(tmp_path / "base_diffusers"), to_diffusers=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert load_adapters(pipe_family("sd"), pipe, str(out), None) == {}  # folded: generate and evaluate do this
    expected = sd_outputs(pipe, data)
    assert all(e > 1e-3 for e in relative_errors(expected, base_outputs, ("hidden", "pred")).values())

    exported = load_file(str(out / "export-diffusers" / "pytorch_lora_weights.safetensors"))
    assert exported["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"].shape \
        == (64,)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector.weight" in exported
    client(torch_python, "unet", tmp_path / "base_diffusers", inputs, tmp_path / "t.npz", "--lora",
           out / "export-diffusers" / "pytorch_lora_weights.safetensors")
    errors = relative_errors(dict(np.load(tmp_path / "t.npz")), expected, ("hidden", "pred"))
    print("diffusers DoRA vs Paddle", errors)
    assert all(e <= 1e-4 for e in errors.values()), errors

    kohya = load_file(str(out / "export-kohya" / "lora_kohya.safetensors"))
    state = to_peft_keys(load_file(str(out / LORA_WEIGHTS_NAME)))
    check_kohya_layout(kohya, base, pipe, state, sd_kohya_name)
    assert set(lora_to_kohya(state)) == set(kohya)


@pytest.mark.slow
def test_sdxl_dora_loads_in_diffusers(torch_python, tiny_sdxl_model, photos, tmp_path):
    from ppdreambooth.interop.exports import kohya_names

    out = dora_run(tiny_sdxl_model, photos, tmp_path / "dora")
    inputs, data = sd_inputs(tmp_path)
    family = pipe_family("sdxl")
    base = family.load_pipeline(tiny_sdxl_model)
    base_outputs = sdxl_outputs(base, data)
    base.save_pretrained(str(tmp_path / "base_diffusers"), to_diffusers=True)
    pipe = family.load_pipeline(tiny_sdxl_model)
    load_adapters(family, pipe, str(out), None)
    expected = sdxl_outputs(pipe, data)
    assert all(e > 1e-3 for e in relative_errors(expected, base_outputs, ("hidden", "pooled", "pred")).values())
    client(torch_python, "unet_sdxl", tmp_path / "base_diffusers", inputs, tmp_path / "t.npz", "--lora",
           out / "export-diffusers" / "pytorch_lora_weights.safetensors")
    errors = relative_errors(dict(np.load(tmp_path / "t.npz")), expected, ("hidden", "pooled", "pred"))
    print("diffusers SDXL DoRA vs Paddle", errors)
    assert all(e <= 1e-4 for e in errors.values()), errors
    kohya = load_file(str(out / "export-kohya" / "lora_kohya.safetensors"))
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj.dora_scale" in kohya
    check_kohya_layout(kohya, base, pipe, to_peft_keys(load_file(str(out / LORA_WEIGHTS_NAME))), kohya_names(str(out)))


@pytest.mark.slow
def test_sd3_dora_loads_in_diffusers(torch_python, tiny_sd3_model, photos, tmp_path):

    out = dora_run(tiny_sd3_model, photos, tmp_path / "dora", family_args=(), formats="diffusers")
    family = pipe_family("sd3")
    rng = np.random.RandomState(0)
    data = dict(latents=rng.standard_normal((2, 16, 8, 8)).astype("float32"),
                timesteps=np.array([30.0, 870.0], dtype="float32"),
                encoder_hidden_states=rng.standard_normal((2, 154, 96)).astype("float32"),
                pooled_projections=rng.standard_normal((2, 64)).astype("float32"))
    np.savez(tmp_path / "inputs.npz", **data)

    def prediction(pipe):
        conditioning = {"prompt_embeds": paddle.to_tensor(data["encoder_hidden_states"]),
                        "pooled_prompt_embeds": paddle.to_tensor(data["pooled_projections"])}
        with paddle.no_grad():
            return {"pred": family.predict(pipe.transformer, paddle.to_tensor(data["latents"]),
                                           paddle.to_tensor(data["timesteps"]), conditioning).numpy()}

    base = family.load_pipeline(tiny_sd3_model)
    base_outputs = prediction(base)
    export(tiny_sd3_model, "diffusers", str(tmp_path / "base_diffusers"))
    load_adapters(family, base, str(out), None)
    expected = prediction(base)
    assert relative_errors(expected, base_outputs, ("pred",))["pred"] > 1e-3
    exported = load_file(str(out / "export-diffusers" / "pytorch_lora_weights.safetensors"))
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_magnitude_vector" in exported
    client(torch_python, "sd3", tmp_path / "base_diffusers", tmp_path / "inputs.npz", tmp_path / "t.npz", "--lora",
           out / "export-diffusers" / "pytorch_lora_weights.safetensors")
    errors = relative_errors(dict(np.load(tmp_path / "t.npz")), expected, ("pred",))
    print("diffusers SD3 DoRA vs Paddle", errors)
    assert errors["pred"] <= 1e-4, errors


def test_the_diffusers_file_names_text_encoder_magnitudes_as_transformers_loads_them():
    state = {"unet.a.to_q.lora_magnitude_vector": np.ones(3, np.float32),
             "text_encoder.b.q_proj.lora_magnitude_vector": np.ones(3, np.float32),
             "text_encoder_2.b.q_proj.lora_A.weight": np.ones((3, 2), np.float32)}
    out = lora_to_diffusers(state)
    assert set(out) == {"unet.a.to_q.lora_magnitude_vector", "text_encoder.b.q_proj.lora_magnitude_vector.weight",
                        "text_encoder_2.b.q_proj.lora_A.weight"}
    assert out["text_encoder_2.b.q_proj.lora_A.weight"].shape == (2, 3)  # PyTorch's layout
