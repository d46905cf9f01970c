"""Prior preservation without class images (`--prior_preservation_mode base_prediction`, LoRA): the class half
is the instance latents under the class prompt, and its target is the base model's own prediction."""
import numpy as np
import paddle
import pytest

from ppdreambooth.errors import ConfigError
from ppdreambooth.config.arguments import ModelArguments
from helpers.models import collate
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset, mirror_with_prompt
from ppdreambooth.data.photos import load_image_set
from ppdreambooth.data.images import list_image_files
from ppdreambooth.modeling.build import build_model


def build(path, photos, **kw):
    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=path, use_lora=True, **kw),
                                with_prior_preservation=True, base_prediction_prior=True)
    instance = load_image_set(list_image_files(photos), "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    prior = mirror_with_prompt(instance, model.tokenize("a photo of dog"))
    dataset = DreamBoothDataset([ConceptData(instance, prior, prior_mirrors_instance=True)], random_flip=True,
                                size_conditioning=model.family.size_conditioning)
    return model, dataset


def test_the_prior_half_is_the_instance_example_under_the_class_prompt(tiny_model, photos):
    model, dataset = build(tiny_model, photos)
    for seed in range(6):  # random crops (80x96 photos) and flips: replayed exactly for the class half
        item = dataset[(seed % 4, seed)]
        assert np.array_equal(item["instance"]["pixel_values"], item["class"]["pixel_values"])
        assert np.array_equal(item["class"]["input_ids"], model.tokenize("a photo of dog")["input_ids"])
        assert not np.array_equal(item["instance"]["input_ids"], item["class"]["input_ids"])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_prior_loss_is_zero_with_untrained_adapters_and_matches_the_base_prediction(family, tiny_model,
                                                                                     tiny_sd3_model, photos):
    model, dataset = build(tiny_model if family == "sd" else tiny_sd3_model, photos)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    paddle.seed(0)
    out = model(**batch)
    assert float(out["loss_prior"]) == 0.0 and float(out["loss_instance"]) > 0  # lora_B starts at zero

    optimizer = paddle.optimizer.AdamW(learning_rate=5e-2, parameters=model.trainable_parameters())
    model.train()
    for step in range(3):
        paddle.seed(step)
        model(**collate([dataset[(step % 4, step)]]))["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    # by hand: same noisy latents and timesteps for both halves; the class half's target is the prediction
    # of the model with its adapters off, for the class prompt
    noise_shape = [2, model.denoiser.config.in_channels, 8, 8]
    noise = paddle.randn(noise_shape)
    timesteps = paddle.to_tensor([300, 800], dtype="int64" if family == "sd" else "float32")
    full_noise, full_steps = paddle.concat([noise, noise]), paddle.concat([timesteps, timesteps])
    paddle.seed(5)
    with paddle.no_grad():
        out = model(**batch, noise=full_noise, timesteps=full_steps)
    paddle.seed(5)
    with paddle.no_grad():
        mean, std = model.latent_moments(batch["pixel_values"][:2])
        latents = model.sample_latents(mean, std)
        noisy = model.objective.noisy_latents(latents, noise, timesteps)
        class_cond = model.encode_prompts({k: v[2:] for k, v in batch.items() if k.startswith("input_ids")})
        trained = model.objective.prediction(model.family.predict(model.denoiser, noisy, timesteps, class_cond),
                                             noisy, timesteps)
        model.denoiser.disable_adapters()
        base = model.objective.prediction(model.family.predict(model.denoiser, noisy, timesteps, class_cond),
                                          noisy, timesteps)
        model.denoiser.enable_adapters()
    expected = float(((trained - base) ** 2).mean())
    assert expected > 0 and float(out["loss_prior"]) == pytest.approx(expected, rel=1e-4)


def test_base_prediction_needs_lora(tiny_model):
    with pytest.raises(ConfigError, match="base_prediction needs --with_prior_preservation and --use_lora"):
        build_model(ModelArguments(pretrained_model_name_or_path=tiny_model), with_prior_preservation=True,
                        base_prediction_prior=True)


@pytest.mark.slow
def test_base_prediction_trains_without_class_images_and_resumes_exactly(tiny_model, photos, tmp_path):
    from safetensors.numpy import load_file

    from helpers.runs import run_module, train_argv, truncate_run_to

    extra = ["--use_lora", "--with_prior_preservation", "--prior_preservation_mode", "base_prediction",
             "--class_prompt", "a photo of dog", "--random_flip", "--checkpointing_steps", "2"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=5, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ", prior " in result.stdout and not any(p.name.startswith("class") for p in tmp_path.iterdir())
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, resumed, steps=5,
                                                                  extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(str(d / "paddle_lora_weights.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the option needs LoRA, refused before anything loads
    refused = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, tmp_path / "x", extra=extra[1:])])
    assert refused.returncode == 2 and "add --use_lora" in refused.stderr
    refused = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, tmp_path / "x",
                                                                  extra=extra + ["--train_text_encoder"])])
    assert refused.returncode == 2 and "with --train_text_encoder the prior target" in refused.stderr
