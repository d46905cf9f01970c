"""Loss and noise variants (kohya's sd-scripts options): each formula against a NumPy transcription, the off
values giving today's loss bit for bit, every option changing what each family computes, bad values refused before
any model loads, and an exact resume with the variants on."""
import math

import numpy as np
import paddle
import pytest

from helpers.models import collate, make_model
from helpers.runs import train_argv
from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.losses import (
    debiased_weights,
    dreambooth_loss,
    elementwise_loss,
    flow_noisy_latents,
    flow_prediction,
    flow_timestep_density,
    huber_threshold,
    per_sample_loss,
)
from ppdreambooth.modeling.noise import offset_noise, perturbed_noise, pyramid_noise
from ppdreambooth.modeling.objectives import DiffusionObjective, FlowMatchingObjective, LossVariants

# every option at its off value (the numbers that matter only when an option is on are not the defaults)
OFF = dict(loss_type="l2", huber_schedule="constant", huber_c=0.5, min_timestep=0, max_timestep=1000,
           multires_noise_iterations=0, multires_noise_discount=0.7, adaptive_noise_scale=0.0, ip_noise_gamma=0.0,
           debiased_estimation_loss=False)


def ddpm_scheduler():
    from ppdiffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False)


def flow_scheduler():
    from ppdiffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


# ----- the formulas against NumPy -----------------------------------------------------------------------------
def np_threshold(t, schedule, c, abar=None, steps=1000):
    t = np.asarray(t, dtype=np.float64)
    if schedule == "constant":
        return np.full(t.shape, c)
    if schedule == "exponential":
        return np.exp(np.log(c) / steps * t)  # alpha = -ln(c) / T, c_t = exp(-alpha t)
    sigma = np.sqrt((1 - abar[t.astype(int)]) / abar[t.astype(int)])
    return (1 - c) / (1 + sigma) ** 2 + c


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_and_smooth_l1_match_numpy(loss_type, schedule):
    scheduler = ddpm_scheduler()
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(4, 4, 6, 6)) * 2, rng.normal(size=(4, 4, 6, 6))
    steps = np.array([0, 17, 500, 999])
    c = np_threshold(steps, schedule, 0.1, abar)
    got_c = huber_threshold(paddle.to_tensor(steps), schedule, 0.1, 1000, scheduler.alphas_cumprod).numpy()
    np.testing.assert_allclose(got_c, c, rtol=1e-5)
    cb = c.reshape(-1, 1, 1, 1)
    root = np.sqrt((pred - target) ** 2 + cb ** 2) - cb
    want = 2 * cb * root if loss_type == "huber" else 2 * root
    p, q, ct = (paddle.to_tensor(x, dtype="float32") for x in (pred, target, c))
    np.testing.assert_allclose(elementwise_loss(p, q, loss_type, ct).numpy(), want, rtol=2e-5, atol=5e-6)
    per_sample = want.reshape(4, -1).mean(1)
    np.testing.assert_allclose(per_sample_loss(p, q, loss_type, ct).numpy(), per_sample, rtol=2e-5)
    weights = np.array([1.0, 0.5, 2.0, 0.25])
    out = dreambooth_loss(p, q, 2, 0.7, paddle.to_tensor(weights, dtype="float32"), loss_type, ct)
    weighted = per_sample * weights
    assert float(out["loss"]) == pytest.approx(weighted[:2].mean() + 0.7 * weighted[2:].mean(), rel=2e-5)
    # the schedules' ends: exponential runs from 1 at t = 0 to c at t = T; snr from about 1 to about c
    if schedule == "exponential":
        assert got_c[0] == pytest.approx(1.0) and np_threshold([1000], schedule, 0.1)[0] == pytest.approx(0.1)
    if schedule == "snr":
        assert got_c[0] > 0.9 and got_c[-1] < 0.11


def test_huber_threshold_on_flow_timesteps_matches_numpy():
    timesteps = np.array([2.99, 250.5, 999.0, 1000.0])
    got = huber_threshold(paddle.to_tensor(timesteps, dtype="float32"), "exponential", 0.2, 1000).numpy()
    np.testing.assert_allclose(got, np_threshold(timesteps, "exponential", 0.2), rtol=1e-5)
    with pytest.raises(ValueError, match="DDPM noise schedule"):
        huber_threshold(paddle.to_tensor(timesteps, dtype="float32"), "snr", 0.2, 1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_match_numpy(prediction_type):
    scheduler = ddpm_scheduler()
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    steps = np.array([0, 1, 40, 300, 999])
    snr = np.minimum(abar[steps] / (1 - abar[steps]), 1000.0)
    assert abar[0] / (1 - abar[0]) > 1000  # the cap matters at t = 0
    want = 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / np.sqrt(snr)
    got = debiased_weights(scheduler, paddle.to_tensor(steps), prediction_type).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # with Min-SNR the objective multiplies both
    objective = DiffusionObjective(scheduler, prediction_type, snr_gamma=5.0,
                                   variants=LossVariants(debiased_estimation_loss=True))
    min_snr = np.minimum(abar[steps] / (1 - abar[steps]), 5.0) / (
        abar[steps] / (1 - abar[steps]) + (1 if prediction_type == "v_prediction" else 0))
    np.testing.assert_allclose(objective.loss_weights(paddle.to_tensor(steps)).numpy(), min_snr * want, rtol=1e-4)


def np_bilinear(x, height, width):
    """Bilinear upsampling with half-pixel centres (align_corners=False), as torch's and Paddle's."""
    def weights(size_in, size_out):
        src = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, src - low

    y0, y1, fy = weights(x.shape[2], height)
    x0, x1, fx = weights(x.shape[3], width)
    rows = x[:, :, y0, :] * (1 - fy)[:, None] + x[:, :, y1, :] * fy[:, None]
    return rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx


def np_pyramid(noise, factors, levels, discount):
    """kohya's pyramid noise given its random draws: the factors r_i and the low-resolution Gaussians."""
    height, width = noise.shape[2:]
    noise = noise.astype(np.float64).copy()
    for i, low in enumerate(levels):
        shrink = float(factors[i]) ** i
        assert low.shape[2:] == (max(1, int(height / shrink)), max(1, int(width / shrink)))
        noise += np_bilinear(low.astype(np.float64), height, width) * discount ** i
    return noise / noise.std(ddof=1)


@pytest.mark.parametrize("iterations, discount", [(6, 0.3), (2, 0.8), (10, 0.5)])
def test_pyramid_noise_matches_numpy_given_the_same_draws(iterations, discount):
    base = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 4, 12, 10)), dtype="float32")
    paddle.seed(5)
    got = pyramid_noise(base, iterations, discount).numpy()
    paddle.seed(5)  # the same draws, in the same order: all factors first, then one Gaussian per level used
    factors = (paddle.rand([iterations], dtype="float32") * 2.0 + 2.0).numpy()
    levels = []
    for i in range(iterations):
        shape = [max(1, int(12 / float(factors[i]) ** i)), max(1, int(10 / float(factors[i]) ** i))]
        levels.append(paddle.randn([2, 4, *shape], dtype="float32").numpy())
        if 1 in shape:
            break
    assert 1 < len(levels) <= iterations
    np.testing.assert_allclose(got, np_pyramid(base.numpy(), factors, levels, discount), rtol=1e-4, atol=1e-5)
    assert got.std(ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_adaptive_noise_scale_matches_numpy():
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(3, 4, 8, 8)) + np.array([0.0, 0.5, -2.0, 0.1]).reshape(1, 4, 1, 1)
    noise = rng.normal(size=(3, 4, 8, 8))
    lat, noi = paddle.to_tensor(latents, dtype="float32"), paddle.to_tensor(noise, dtype="float32")
    for scale in (0.3, -0.2):  # a negative scale can push the strength below 0: it is floored there
        paddle.seed(9)
        got = offset_noise(noi, lat, 0.1, scale).numpy()
        paddle.seed(9)
        extra = paddle.randn([3, 4, 1, 1], dtype="float32").numpy()
        strength = np.maximum(0.1 + scale * np.abs(latents.mean(axis=(2, 3), keepdims=True)), 0.0)
        np.testing.assert_allclose(got, noise + strength * extra, rtol=1e-5, atol=1e-6)
        if scale < 0:
            assert (strength == 0).any() and (strength > 0).any()
    paddle.seed(9)  # scale 0: plain offset noise, the same draw
    np.testing.assert_allclose(offset_noise(noi, lat, 0.1, 0.0).numpy(), noise + 0.1 * extra, rtol=1e-6, atol=1e-7)


def test_ip_noise_gamma_perturbs_with_one_more_gaussian():
    noise = paddle.randn([2, 4, 8, 8])
    paddle.seed(4)
    got = perturbed_noise(noise, 0.1).numpy()
    paddle.seed(4)
    np.testing.assert_allclose(got, noise.numpy() + 0.1 * paddle.randn([2, 4, 8, 8]).numpy(), rtol=1e-6, atol=1e-7)
    paddle.seed(4)
    assert perturbed_noise(noise, 0.0) is noise  # off: nothing drawn either
    after = paddle.randn([3]).numpy()
    paddle.seed(4)
    np.testing.assert_array_equal(after, paddle.randn([3]).numpy())


def test_ddpm_timestep_range_stays_in_range_and_covers_it():
    objective = DiffusionObjective(ddpm_scheduler(), variants=LossVariants(min_timestep=100, max_timestep=110))
    _, steps = objective.draw(paddle.zeros([2000, 4, 1, 1]))
    assert sorted(set(steps.numpy().tolist())) == list(range(100, 110))
    objective = DiffusionObjective(ddpm_scheduler(), variants=LossVariants(min_timestep=950))
    _, steps = objective.draw(paddle.zeros([2000, 4, 1, 1]))
    assert sorted(set(steps.numpy().tolist())) == list(range(950, 1000))
    with pytest.raises(ConfigError, match="--min_timestep 10 / --max_timestep 5"):
        DiffusionObjective(ddpm_scheduler(), variants=LossVariants(min_timestep=10, max_timestep=5))


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_flow_timestep_range_keeps_the_grid_entries_in_range(scheme):
    scheduler = flow_scheduler()
    grid = scheduler.sigmas.numpy() * 1000
    objective = FlowMatchingObjective(scheduler, scheme, variants=LossVariants(min_timestep=100, max_timestep=900))
    inside = grid[(grid >= 100) & (grid <= 900)]
    assert objective.grid_range == (int(np.nonzero(grid <= 900)[0][0]), len(inside))
    _, steps = objective.draw(paddle.zeros([20000, 16, 1, 1]))
    steps = steps.numpy()
    assert steps.min() >= 100 and steps.max() <= 900
    drawn = set(np.round(steps, 3).tolist())
    assert drawn <= set(np.round(inside, 3).tolist())
    if scheme == "uniform":  # every entry in the range is drawn
        assert len(drawn) == len(inside)
    # the whole range (explicitly 0..1000) draws as without one
    assert FlowMatchingObjective(scheduler, scheme, variants=LossVariants(min_timestep=0,
                                                                          max_timestep=1000)).grid_range is None
    with pytest.raises(ConfigError, match="no sigma of this model's flow-matching grid"):
        FlowMatchingObjective(scheduler, scheme, variants=LossVariants(min_timestep=0, max_timestep=2))


def test_flow_objective_refuses_what_needs_a_ddpm_schedule():
    with pytest.raises(ConfigError, match="--ip_noise_gamma acts on a DDPM noise schedule"):
        FlowMatchingObjective(flow_scheduler(), variants=LossVariants(ip_noise_gamma=0.1))
    with pytest.raises(ConfigError, match="--huber_schedule snr needs a DDPM noise schedule"):
        FlowMatchingObjective(flow_scheduler(), variants=LossVariants(loss_type="huber"))


# ----- in the model: off values are today's loss; each option changes what each family computes ----------------
def family_batch(model, photos, rows=2):
    from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
    from ppdreambooth.data.photos import load_image_set
    from ppdreambooth.data.images import list_image_files

    instance = load_image_set(list_image_files(photos), "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    dataset = DreamBoothDataset([ConceptData(instance)], center_crop=True,
                                size_conditioning=model.family.size_conditioning)
    return collate([dataset[(i, i)] for i in range(rows)])


def todays_loss(model, batch):
    """The loss exactly as the forward pass computed it before the variants existed (l2, uniform timesteps,
    plain noise), for a model with default settings: the same operations in the same order."""
    from ppdreambooth.batch import is_token_key

    batch = dict(batch)
    pixels = batch.pop("pixel_values")
    tokens = {k: batch.pop(k) for k in [k for k in batch if is_token_key(k)]}
    latents = model.sample_latents(*model.latent_moments(pixels))
    noise = paddle.randn(latents.shape, dtype="float32")
    if model.family.objective == "flow":
        u = flow_timestep_density(latents.shape[0], "logit_normal", 0.0, 1.0, 1.29)
        indices = paddle.clip((u * 1000).astype("int64"), 0, 999)
        timesteps = paddle.gather(model.objective.sigma_grid, indices) * 1000
        sigmas = timesteps.astype("float32") / 1000
        noisy, target = flow_noisy_latents(latents, noise, sigmas), latents
    else:
        timesteps = paddle.randint(0, 1000, [latents.shape[0]], dtype="int64")
        noisy, target = model.noise_scheduler.add_noise(latents, noise, timesteps), noise
    conditioning = dict(batch, **model.encode_prompts(tokens))
    raw = model.family.predict(model.denoiser, noisy, timesteps, conditioning)
    pred = flow_prediction(raw, noisy, sigmas, True) if model.family.objective == "flow" else raw
    diff = pred.astype("float32") - target.astype("float32")
    return (diff * diff).reshape([diff.shape[0], -1]).mean(axis=1).mean()


def losses(model, batch, seed=3):
    model.eval()
    paddle.seed(seed)
    with paddle.no_grad():
        return model(**batch)


def test_off_values_are_todays_loss_bit_for_bit(family_model, photos):
    family, path = family_model
    default = make_model(path)
    off = make_model(path, **OFF)
    batch = family_batch(default, photos)
    want = losses(default, batch)
    got = losses(off, batch)
    for key in want:
        assert np.array_equal(got[key].numpy(), want[key].numpy()), key
    default.eval()
    paddle.seed(3)
    with paddle.no_grad():
        today = todays_loss(default, batch)
    assert np.array_equal(want["loss"].numpy(), today.numpy()), (float(want["loss"]), float(today))
    if family != "sd3":  # also with offset noise and Min-SNR on
        plus = dict(noise_offset=0.1, snr_gamma=5.0)
        assert np.array_equal(losses(make_model(path, **OFF, **plus), batch)["loss"].numpy(),
                              losses(make_model(path, **plus), batch)["loss"].numpy())


DDPM_VARIANTS = {
    "huber_snr": dict(loss_type="huber"),
    "smooth_l1_exponential": dict(loss_type="smooth_l1", huber_schedule="exponential"),
    "ip_noise_gamma": dict(ip_noise_gamma=0.1),
    "multires_noise": dict(multires_noise_iterations=6, multires_noise_discount=0.3),
    "debiased_estimation": dict(debiased_estimation_loss=True),
}


@pytest.mark.slow  # builds a model per case (the fast suite keeps the bit-identity checks)
@pytest.mark.parametrize("variant", list(DDPM_VARIANTS))
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_each_ddpm_variant_changes_the_loss(family, variant, tiny_model, tiny_sdxl_model, photos):
    path = tiny_model if family == "sd" else tiny_sdxl_model
    plain = make_model(path)
    batch = family_batch(plain, photos)
    a, b = losses(plain, batch)["loss"], losses(make_model(path, **DDPM_VARIANTS[variant]), batch)["loss"]
    assert np.isfinite(float(b)) and float(a) != float(b)


@pytest.mark.slow  # builds a model per case (the fast suite keeps the bit-identity checks)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_adaptive_noise_scale_changes_the_offset_noise(family, tiny_model, tiny_sdxl_model, photos):
    path = tiny_model if family == "sd" else tiny_sdxl_model
    offset = make_model(path, noise_offset=0.1)
    batch = family_batch(offset, photos)
    a = losses(offset, batch)["loss"]
    b = losses(make_model(path, noise_offset=0.1, adaptive_noise_scale=0.5), batch)["loss"]
    assert float(a) != float(b)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_ip_noise_gamma_perturbs_the_input_and_keeps_the_target(family, tiny_model, tiny_sdxl_model, photos):
    """With given noise and timesteps: the denoiser's input is add_noise(latents, noise + g * N(0, 1)), drawn right
    after the latent sample; the target is still the given noise."""
    path = tiny_model if family == "sd" else tiny_sdxl_model
    model = make_model(path, ip_noise_gamma=0.1)
    model.eval()
    batch = family_batch(model, photos)
    seen = record_denoiser_inputs(model)
    noise, timesteps = paddle.randn([2, 4, 8, 8]), paddle.to_tensor([50, 700], dtype="int64")
    paddle.seed(3)
    with paddle.no_grad():
        out = model(**batch, noise=noise, timesteps=timesteps)
        paddle.seed(3)
        latents = model.sample_latents(*model.latent_moments(batch["pixel_values"]))
        perturbed = noise + 0.1 * paddle.randn(noise.shape, dtype="float32")
        want_input = model.noise_scheduler.add_noise(latents, perturbed, timesteps)
        assert np.allclose(seen[0][0].numpy(), want_input.numpy(), atol=1e-6)
        raw = model.family.predict(model.denoiser, want_input, timesteps, seen[0][1])
    want = ((raw - noise) ** 2).reshape([2, -1]).mean(1).mean()  # the target: the plain noise
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-5)


def record_denoiser_inputs(model):
    """A list that receives (noisy input, conditioning) of every denoiser call of `model`."""
    seen, predict = [], model.family.predict

    def recording(denoiser, noisy, timesteps, conditioning):
        seen.append((noisy, conditioning, timesteps))
        return predict(denoiser, noisy, timesteps, conditioning)

    model.family = type(model.family)()  # an instance of its own: the patch stays with this model
    model.family.predict = recording
    return seen


def test_base_prediction_prior_sees_the_same_perturbed_input(tiny_model, photos):
    from ppdreambooth.config.arguments import ModelArguments
    from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset, mirror_with_prompt
    from ppdreambooth.data.photos import load_image_set
    from ppdreambooth.data.images import list_image_files
    from ppdreambooth.modeling.build import build_model

    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=tiny_model, use_lora=True,
                                           ip_noise_gamma=0.1), with_prior_preservation=True,
                            base_prediction_prior=True)
    model.eval()
    instance = load_image_set(list_image_files(photos), "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    prior = mirror_with_prompt(instance, model.tokenize("a photo of dog"))
    dataset = DreamBoothDataset([ConceptData(instance, prior, prior_mirrors_instance=True)], center_crop=True)
    batch = collate([dataset[(0, 0)], dataset[(1, 1)]])
    seen = record_denoiser_inputs(model)
    paddle.seed(3)
    with paddle.no_grad():
        out = model(**batch)
    trained_input, base_input = seen[0][0], seen[1][0]  # the training call (4 rows), the base model's (class rows)
    assert np.array_equal(trained_input[:2].numpy(), trained_input[2:].numpy())  # one perturbed input per example
    assert np.array_equal(base_input.numpy(), trained_input[2:].numpy())
    assert float(out["loss_prior"]) == 0.0  # untrained adapters: the base model's prediction on the same input
    paddle.seed(3)  # and the input is the perturbed one, not add_noise(latents, noise)
    with paddle.no_grad():
        latents = model.sample_latents(*model.latent_moments(batch["pixel_values"][:2]))
        noise, timesteps = model.objective.draw(latents)
        plain = model.noise_scheduler.add_noise(latents, noise, timesteps)
        perturbed = model.noise_scheduler.add_noise(latents, model.objective.input_noise(noise), timesteps)
    assert not np.allclose(plain.numpy(), trained_input[:2].numpy())
    assert np.array_equal(perturbed.numpy(), trained_input[:2].numpy())


@pytest.mark.slow  # builds a model per case (the fast suite keeps the bit-identity checks)
@pytest.mark.parametrize("schedule", ["constant", "exponential"])
def test_sd3_huber_changes_the_loss(schedule, tiny_sd3_model, photos):
    plain = make_model(tiny_sd3_model)
    batch = family_batch(plain, photos)
    a = losses(plain, batch)["loss"]
    b = losses(make_model(tiny_sd3_model, loss_type="huber", huber_schedule=schedule, huber_c=0.1), batch)["loss"]
    c = losses(make_model(tiny_sd3_model, loss_type="smooth_l1", huber_schedule=schedule), batch)["loss"]
    assert len({float(a), float(b), float(c)}) == 3


@pytest.mark.slow  # builds a model per case (the fast suite keeps the bit-identity checks)
def test_the_timestep_range_is_respected(family_model, photos):
    family, path = family_model
    model = make_model(path, min_timestep=100, max_timestep=900)
    zeros = paddle.zeros([4000, model.denoiser.config.in_channels, 1, 1])
    paddle.seed(0)
    steps = model.objective.draw(zeros)[1].numpy()
    assert steps.min() >= 100 and (steps.max() < 900 if family != "sd3" else steps.max() <= 900)
    paddle.seed(0)
    everywhere = make_model(path).objective.draw(zeros)[1].numpy()
    assert ((everywhere < 100) | (everywhere > 900)).sum() > 100  # without the range, draws fall outside it
    seen = record_denoiser_inputs(model)  # and the forward pass trains at those timesteps
    batch = family_batch(model, photos, rows=4)
    for seed in range(3):
        losses(model, batch, seed)
    used = np.concatenate([timesteps.numpy() for _, _, timesteps in seen])
    assert used.min() >= 100 and used.max() <= 900


# ----- refused before any model loads ------------------------------------------------------------------------
BAD = [
    (["--loss_type", "l1"], "invalid choice"),
    (["--huber_schedule", "cosine"], "invalid choice"),
    (["--huber_c", "0"], "--huber_c 0.0 is out of range: it must be a number > 0 and <= 1"),
    (["--min_timestep", "1000"], "--min_timestep 1000 is out of range"),
    (["--max_timestep", "1001"], "--max_timestep 1001 is out of range"),
    (["--min_timestep", "500", "--max_timestep", "400"], "--min_timestep 500 must be below --max_timestep 400"),
    (["--multires_noise_iterations", "-1"], "--multires_noise_iterations -1 is out of range"),
    (["--multires_noise_discount", "1.5"], "--multires_noise_discount 1.5 is out of range"),
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale adjusts the offset noise's strength; it needs "
                                        "--noise_offset"),
    (["--noise_offset", "0.1", "--adaptive_noise_scale", "3"], "--adaptive_noise_scale 3.0 is out of range"),
    (["--ip_noise_gamma", "-0.1"], "--ip_noise_gamma -0.1 is out of range"),
]
SD3_BAD = [
    (["--ip_noise_gamma", "0.1"], "--ip_noise_gamma is a DDPM option; SD3 trains by flow matching"),
    (["--multires_noise_iterations", "6"], "--multires_noise_iterations is a DDPM option; SD3 trains by flow"),
    (["--debiased_estimation_loss"], "--debiased_estimation_loss is a DDPM option; SD3 trains by flow matching"),
    (["--noise_offset", "0.1", "--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale is a DDPM option"),
    (["--loss_type", "huber"], "--loss_type huber with --huber_schedule snr (the default): the snr schedule takes"),
    (["--loss_type", "smooth_l1", "--huber_schedule", "snr"], "Add --huber_schedule constant or exponential"),
]


@pytest.mark.parametrize("extra, message", BAD + [(["--sd3"] + e, m) for e, m in SD3_BAD],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_values_are_refused_before_loading(extra, message, tiny_model, tiny_sd3_model, photos, tmp_path, capsys,
                                               no_model_loading):
    from ppdreambooth import train

    model = tiny_sd3_model if extra[:1] == ["--sd3"] else tiny_model
    extra = [e for e in extra if e != "--sd3"]
    assert train.main(train_argv(model, photos, tmp_path / "out", extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sd3_accepts_what_flow_matching_can_do(tiny_sd3_model):
    """The flags SD3 honours build (the preflight refusals above are for the others)."""
    model = make_model(tiny_sd3_model, loss_type="smooth_l1", huber_schedule="exponential", min_timestep=10,
                       max_timestep=990)
    assert model.objective.loss_type == "smooth_l1" and model.objective.grid_range is not None
    assert math.isclose(float(model.objective.huber_threshold(paddle.to_tensor([0.0]))), 1.0)


# ----- training -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_huber_timestep_range_and_ip_noise_resume_exactly(tiny_model, photos, tmp_path):
    from helpers.models import load_unet_weights
    from helpers.runs import run_module, truncate_run_to

    extra = ["--loss_type", "huber", "--min_timestep", "100", "--max_timestep", "900", "--ip_noise_gamma", "0.1",
             "--random_flip", "--lr_scheduler", "linear", "--checkpointing_steps", "2"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=5, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train",
                         *train_argv(tiny_model, photos, resumed, steps=5,
                                     extra=extra + ["--resume_from_checkpoint", str(resumed / "checkpoint-2")])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global step 2" in result.stderr + result.stdout
    a, b = load_unet_weights(str(full)), load_unet_weights(str(resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
