"""SD3: the flow-matching formulas against NumPy, the loss against first principles, optional T5, recompute,
LoRA round trip, and the options refused for the wrong objective."""
import math
import os

import numpy as np
import paddle
import pytest

from helpers.models import make_model as make
from ppdreambooth.families import FAMILIES
from ppdreambooth.modeling.losses import (
    flow_loss_weights,
    flow_noisy_latents,
    flow_prediction,
    flow_target,
    flow_timestep_density,
)


def batch_of(model, prompts):
    rows = [model.tokenize(p) for p in prompts]
    return {k: paddle.to_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}


# ----- formulas -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"])
def test_timestep_density_matches_numpy(scheme):
    paddle.seed(4)
    u = flow_timestep_density(4096, scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29).numpy()
    paddle.seed(4)  # the same draws, by hand
    if scheme == "logit_normal":
        expected = 1 / (1 + np.exp(-paddle.normal(mean=0.3, std=0.8, shape=[4096]).numpy()))
    else:
        expected = paddle.rand([4096], dtype="float32").numpy()
        if scheme == "mode":
            expected = 1 - expected - 1.29 * (np.cos(math.pi * expected / 2) ** 2 - 1 + expected)
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-6)
    assert u.min() >= 0 and u.max() <= 1
    if scheme == "logit_normal":  # a density, not a per-sample weight: the median sits at sigmoid(mean)
        assert abs(np.median(u) - 1 / (1 + math.exp(-0.3))) < 0.02


def test_flow_path_target_prediction_and_weights_match_numpy():
    rng = np.random.RandomState(0)
    x0, eps = rng.randn(3, 16, 4, 4).astype("float32"), rng.randn(3, 16, 4, 4).astype("float32")
    raw = rng.randn(3, 16, 4, 4).astype("float32")
    sigma = np.array([0.1, 0.5, 0.93], dtype="float32")
    s = sigma.reshape(-1, 1, 1, 1)
    t = {name: paddle.to_tensor(v) for name, v in dict(x0=x0, eps=eps, raw=raw, sigma=sigma).items()}
    noisy = flow_noisy_latents(t["x0"], t["eps"], t["sigma"]).numpy()
    np.testing.assert_allclose(noisy, (1 - s) * x0 + s * eps, rtol=1e-6)
    np.testing.assert_allclose(flow_target(t["x0"], t["eps"], False).numpy(), eps - x0, rtol=1e-6)
    np.testing.assert_allclose(flow_target(t["x0"], t["eps"], True).numpy(), x0)
    pre = flow_prediction(t["raw"], paddle.to_tensor(noisy), t["sigma"], True).numpy()
    np.testing.assert_allclose(pre, noisy - s * raw, rtol=1e-5, atol=1e-6)
    assert np.array_equal(flow_prediction(t["raw"], paddle.to_tensor(noisy), t["sigma"], False).numpy(), raw)
    # an exact velocity prediction recovers x0 once preconditioned
    exact = flow_prediction(paddle.to_tensor(eps - x0), paddle.to_tensor(noisy), t["sigma"], True).numpy()
    np.testing.assert_allclose(exact, x0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flow_loss_weights(t["sigma"], "sigma_sqrt").numpy(), sigma ** -2.0, rtol=1e-6)
    np.testing.assert_allclose(flow_loss_weights(t["sigma"], "cosmap").numpy(),
                               2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)), rtol=1e-6)
    assert flow_loss_weights(t["sigma"], "logit_normal") is None and flow_loss_weights(t["sigma"], "none") is None


def test_timesteps_are_drawn_on_the_shifted_sigma_grid(tiny_sd3_model):
    model = make(tiny_sd3_model)
    grid = model.noise_scheduler.sigmas.numpy()
    paddle.seed(1)
    noise, timesteps = model.objective.draw(paddle.zeros([512, 16, 8, 8]))
    sigmas = timesteps.numpy() / 1000.0
    assert noise.shape == [512, 16, 8, 8] and timesteps.dtype == paddle.float32
    assert np.abs(sigmas[:, None] - grid[None, :]).min(axis=1).max() < 1e-6  # every sigma is a grid point
    assert model.noise_scheduler.config.shift == 3.0 and sigmas.mean() > 0.6  # the shift pushes towards noise


# ----- the loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("precondition", [1, 0], ids=["precondition", "velocity"])
def test_sd3_loss_equals_its_formula(tiny_sd3_model, precondition):
    model = make(tiny_sd3_model, prior=True, prior_loss_weight=0.5, weighting_scheme="sigma_sqrt",
                 precondition_outputs=precondition)
    model.eval()
    paddle.seed(0)
    pixels = paddle.uniform([4, 3, 64, 64], min=-1, max=1)
    tokens = batch_of(model, ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2)
    noise = paddle.randn([4, 16, 8, 8])
    timesteps = paddle.to_tensor([50.0, 400.0, 777.0, 990.0])
    paddle.seed(11)
    with paddle.no_grad():
        out = model(pixels, noise=noise, timesteps=timesteps, **tokens)

    paddle.seed(11)
    mean, std = model.latent_moments(pixels)
    sample = mean.numpy() + std.numpy() * paddle.randn(mean.shape).numpy()
    x0 = (sample - model.vae.config.shift_factor) * model.vae.config.scaling_factor  # SD3's latent shift
    sigma = (timesteps.numpy() / 1000).reshape(-1, 1, 1, 1)
    noisy = (1 - sigma) * x0 + sigma * noise.numpy()
    with paddle.no_grad():
        l_ = model.text_encoder(tokens["input_ids"], output_hidden_states=True)
        g_ = model.text_encoder_2(tokens["input_ids_2"], output_hidden_states=True)
        t5 = model.text_encoder_3(tokens["input_ids_3"])[0].numpy()
        clip = np.concatenate([l_.hidden_states[-2].numpy(), g_.hidden_states[-2].numpy()], -1)
        clip = np.pad(clip, [(0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])])
        raw = model.transformer(hidden_states=paddle.to_tensor(noisy, dtype="float32"), timestep=timesteps,
                                encoder_hidden_states=paddle.to_tensor(np.concatenate([clip, t5], 1)),
                                pooled_projections=paddle.concat([l_.text_embeds, g_.text_embeds], -1)).sample.numpy()
    pred, target = (noisy - sigma * raw, x0) if precondition else (raw, noise.numpy() - x0)
    mse = ((pred - target) ** 2).reshape(4, -1).mean(1) * sigma.reshape(-1) ** -2.0
    assert float(out["loss_instance"]) == pytest.approx(mse[:2].mean(), rel=1e-4)
    assert float(out["loss_prior"]) == pytest.approx(mse[2:].mean(), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(mse[:2].mean() + 0.5 * mse[2:].mean(), rel=1e-4)


def test_without_t5_the_prompt_ends_in_zeros(tiny_sd3_model, tmp_path):
    """--drop_t5 (and a folder without text_encoder_3) conditions on zeros in T5's place, as the pipeline does."""
    from ppdreambooth.families.tiny import build_tiny_pipeline

    dropped = make(tiny_sd3_model, drop_t5=True)
    assert not dropped.has_component("text_encoder_3") and "input_ids_3" not in dropped.tokenize("a dog")
    with paddle.no_grad():
        cond = dropped.encode_prompts(batch_of(dropped, ["a photo of sks dog"]))
    embeds = cond["prompt_embeds"].numpy()
    assert embeds.shape == (1, 154, 96) and not embeds[:, 77:].any() and embeds[:, :77, :64].any()
    assert not embeds[:, :77, 64:].any()  # CLIP's 64 channels padded to T5's 96
    folder = str(tmp_path / "no-t5")
    build_tiny_pipeline(folder, family="sd3", with_t5=False)
    without = make(folder)
    assert not without.has_component("text_encoder_3")
    paddle.seed(0)
    loss = without(paddle.uniform([1, 3, 64, 64], min=-1, max=1), **batch_of(without, ["a dog"]))["loss"]
    assert np.isfinite(float(loss))


# ----- training behaviour -----------------------------------------------------------------------------
def train_steps(model, steps=2, lr=1e-2, seed=0):
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=model.trainable_parameters())
    model.train()
    paddle.seed(seed)
    tokens = batch_of(model, ["a photo of sks dog"] * 2)
    for _ in range(steps):
        model(pixel_values=paddle.uniform([2, 3, 64, 64], min=-1, max=1), **tokens)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()


def test_gradient_checkpointing_gives_the_same_weights(tiny_sd3_model):
    """ppdreambooth recomputes each joint block (ppdiffusers 0.29's own switch crashes for SD3)."""
    plain, recomputed = make(tiny_sd3_model), make(tiny_sd3_model)
    calls = []
    first = recomputed.transformer.transformer_blocks[0]
    forward = first.forward
    first.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    recomputed.enable_recompute()
    train_steps(plain)
    train_steps(recomputed)
    assert len(calls) == 2 * 2  # two steps, each block run again in the backward pass
    a, b = plain.transformer.state_dict(), recomputed.transformer.state_dict()
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6) for k in a)
    base = make(tiny_sd3_model).transformer.state_dict()
    assert any(not np.array_equal(a[k].numpy(), base[k].numpy()) for k in a)


def test_full_fine_tune_trains_the_clips_and_freezes_t5_and_vae(tiny_sd3_model):
    model = make(tiny_sd3_model, train_text_encoder=True)
    before = {n: {k: v.numpy().copy() for k, v in getattr(model, n).state_dict().items()}
              for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    # the last block discards its context stream: its context query gets no gradient and is frozen
    assert model.transformer.transformer_blocks[-1].attn.add_q_proj.weight.stop_gradient
    train_steps(model)
    for name, trained in (("transformer", True), ("vae", False), ("text_encoder", True), ("text_encoder_2", True),
                          ("text_encoder_3", False)):
        now = getattr(model, name).state_dict()
        moved = any(not np.array_equal(now[k].numpy(), v) for k, v in before[name].items())
        assert moved == trained, name


def test_sd3_lora_saves_and_loads_in_the_sd3_pipeline(tiny_sd3_model, tmp_path):
    from ppdiffusers import StableDiffusion3Pipeline

    from ppdreambooth.modeling.lora import save_lora_weights

    model = make(tiny_sd3_model, use_lora=True, lora_rank=4, lora_alpha=8.0)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.trainable_named_parameters()}
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    train_steps(model, steps=3, lr=5e-2)
    tokens = batch_of(model, ["a photo of sks dog"] * 2)

    def probe(transformer, encoders):
        paddle.seed(42)
        latents, t = paddle.randn([2, 16, 8, 8]), paddle.to_tensor([100.0, 700.0])
        with paddle.no_grad():
            cond = FAMILIES["sd3"].encode_prompt(encoders, tokens, transformer.config)
            return FAMILIES["sd3"].predict(transformer, latents, t, cond).numpy()

    trained = probe(model.transformer, model.text_encoders())
    save_lora_weights(str(tmp_path), model.family, model.trained_layers())
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    base = probe(pipe.transformer, encoders)
    pipe.load_lora_weights(str(tmp_path))
    loaded = probe(pipe.transformer, encoders)
    np.testing.assert_allclose(loaded, trained, rtol=1e-5, atol=1e-6)
    assert np.abs(loaded - base).max() > 1e-3

    # folded into the weights (`export --format merged`): a plain pipeline folder, no LoRA loader needed
    from ppdreambooth.interop.exports import export

    export(str(tmp_path), "merged", str(tmp_path / "merged"), model_family="sd3", base_model=tiny_sd3_model)
    merged = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "merged"))
    folded = probe(merged.transformer, {n: getattr(merged, n) for n in encoders})
    np.testing.assert_allclose(folded, trained, rtol=1e-5, atol=1e-5)


def test_lora_layers_chooses_the_adapted_modules(family_model):
    _, path = family_model
    model = make(path, use_lora=True, lora_layers="to_q,to_v")
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.trainable_named_parameters()}
    assert adapted == {"to_q", "to_v"}


def test_max_sequence_length_sets_t5s_share_of_the_prompt(tiny_sd3_model):
    model = make(tiny_sd3_model, max_sequence_length=32)
    tokens = model.tokenize("a photo of sks dog")
    assert tokens["input_ids"].shape == (77,) and tokens["input_ids_3"].shape == (32,)
    with paddle.no_grad():
        embeds = model.encode_prompts({k: paddle.to_tensor(v[None]) for k, v in tokens.items()})["prompt_embeds"]
    assert embeds.shape == [1, 77 + 32, 96]


def test_timestep_density_options_reach_the_objective(tiny_sd3_model):
    """--logit_mean moves the sampled sigmas (u indexes the descending sigma grid, as in diffusers: a higher mean
    draws less noise); --weighting_scheme mode with --mode_scale is used as given."""
    def mean_sigma(**kw):
        model = make(tiny_sd3_model, **kw)
        paddle.seed(0)
        return float((model.objective.draw(paddle.zeros([512, 16, 2, 2]))[1] / 1000).mean())

    assert mean_sigma(logit_mean=2.0) < mean_sigma() < mean_sigma(logit_mean=-2.0)
    assert mean_sigma(logit_std=0.1) != mean_sigma(logit_std=2.0)
    assert mean_sigma(weighting_scheme="mode", mode_scale=0.0) != mean_sigma(weighting_scheme="mode", mode_scale=1.29)


# ----- options refused before any weights load ------------------------------------------------------------
def test_options_of_the_other_objective_are_refused(tiny_model, tiny_sd3_model, photos, tmp_path, capsys):
    from helpers.runs import train_argv
    from ppdreambooth import train

    def error(model, extra):
        assert train.main(train_argv(model, photos, tmp_path / "out", extra=extra)) == 2
        return capsys.readouterr().err

    assert "SD3 trains by flow matching" in error(tiny_sd3_model, ["--snr_gamma", "5"])
    assert "--noise_offset is a DDPM option" in error(tiny_sd3_model, ["--noise_offset", "0.1"])
    assert "--prediction_type is a DDPM option" in error(tiny_sd3_model, ["--prediction_type", "epsilon"])
    assert "--weighting_scheme is a flow-matching (SD3) option" in error(tiny_model, ["--weighting_scheme", "mode"])
    assert "--drop_t5 is a flow-matching (SD3) option" in error(tiny_model, ["--drop_t5"])
    assert "transformer only" in error(tiny_sd3_model, ["--use_lora", "--train_text_encoder"])
    assert "multiples of 16" in error(tiny_sd3_model, ["--resolution", "72"])
    assert not os.path.exists(tmp_path / "out")  # nothing was written


def test_not_validation_final_skips_only_the_closing_images(tiny_sd3_model, tmp_path):
    """PaddleMIX's SD3 flag: no validation images when training ends; the others still come."""
    from types import SimpleNamespace

    from ppdreambooth.training.validation import ValidationCallback

    model = make(tiny_sd3_model)
    args = SimpleNamespace(should_save=True, output_dir=str(tmp_path), seed=0, num_validation_images=1,
                           validation_prompt="a photo of sks dog", validation_inference_steps=2, report_to=[],
                           not_validation_final=True, validation_steps=3, validation_epochs=None)
    callback = ValidationCallback(model)
    callback.on_train_end(args, SimpleNamespace(global_step=5), None)
    assert not (tmp_path / "validation").exists()
    callback.on_step_end(args, SimpleNamespace(global_step=3), None)
    assert (tmp_path / "validation" / "step-3" / "image-0.png").is_file()
    args.not_validation_final = False
    callback.on_train_end(args, SimpleNamespace(global_step=5), None)
    assert (tmp_path / "validation" / "step-5" / "image-0.png").is_file()
