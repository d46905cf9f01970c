"""SD3 end to end, in fresh processes: both PaddleMIX README_sd3 commands, every feature, resume, generate."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.photos import two_concepts
from helpers.runs import run_module, train_argv, truncate_run_to

pytestmark = pytest.mark.slow
TRANSFORMER = os.path.join("transformer", "diffusion_paddle_model.safetensors")


def paddlemix_command(script_module, model, photos, out, resolution, learning_rate, steps):
    """README_sd3's command line with our entry point (tiny model, 64 px, few steps; CPU: no fp16; the README's
    wandb logger becomes visualdl when wandb is not installed)."""
    import importlib.util

    report = "wandb" if importlib.util.find_spec("wandb") else "visualdl"
    return ["-m", script_module, f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={photos}",
            f"--output_dir={out}", "--mixed_precision=no", "--instance_prompt=a photo of sks dog",
            f"--resolution={resolution}", "--train_batch_size=1", "--gradient_accumulation_steps=4",
            f"--learning_rate={learning_rate}", f"--report_to={report}", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--max_train_steps={steps}", "--validation_prompt=A photo of sks dog in a bucket",
            "--validation_epochs=25", "--seed=0", "--checkpointing_steps=2", "--validation_inference_steps=2",
            "--num_validation_images=1"]


def test_paddlemix_sd3_full_command(tiny_sd3_model, photos, tmp_path):
    out = tmp_path / "trained-sd3"
    result = run_module(paddlemix_command("ppdreambooth.train", tiny_sd3_model, photos, out, 64, "1e-4", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "validation" / "step-3" / "image-0.png").is_file() and (out / "checkpoint-2" / ".complete").is_file()
    trained, base = load_file(str(out / TRANSFORMER)), load_file(os.path.join(tiny_sd3_model, TRANSFORMER))
    assert any(not np.array_equal(trained[k], base[k]) for k in base)
    vae = os.path.join("vae", "diffusion_paddle_model.safetensors")
    a, b = load_file(str(out / vae)), load_file(os.path.join(tiny_sd3_model, vae))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the VAE is frozen
    t5 = os.path.join("text_encoder_3", "model.safetensors")
    a, b = load_file(str(out / t5)), load_file(os.path.join(tiny_sd3_model, t5))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # and T5

    # the README's inference: the SD3 pipeline loads the output folder
    from ppdiffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    image = pipe("A picture of a sks dog in a bucket", num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_paddlemix_sd3_lora_command_and_generate_with_the_adapters(tiny_sd3_model, photos, tmp_path):
    out = tmp_path / "trained-sd3-lora"
    result = run_module(paddlemix_command("ppdreambooth.train_lora", tiny_sd3_model, photos, out, 64, "5e-2", 3),
                        env={"USE_PEFT_BACKEND": "True"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(str(out / "paddle_lora_weights.safetensors"))
    assert saved and all(k.startswith("transformer.") and "lora" in k for k in saved)
    assert any(".add_q_proj." in k for k in saved) and any(".to_add_out." in k for k in saved)  # context stream too
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "peft backend" in card and "--format merged" in card
    assert "needs ppdiffusers' peft backend" in result.stdout  # the closing summary says so too

    # generate with the adapters: at scale 0 the base model's image, at scale 1 the validation image
    images = {}
    for scale in ("0", "1"):
        folder = tmp_path / f"samples-{scale}"
        result = run_module(["-m", "ppdreambooth.generate", "--model", tiny_sd3_model, "--lora", str(out),
                             "--lora_scale", scale, "--prompt", "A photo of sks dog in a bucket", "--num_images", "1",
                             "--steps", "2", "--seed", "0", "--out", str(folder)])
        assert result.returncode == 0, result.stderr[-3000:]
        images[scale] = np.asarray(__import__("PIL.Image").Image.open(
            next(folder / n for n in os.listdir(folder) if n.startswith("00-"))), dtype=np.int16)
    base = tmp_path / "samples-base"
    result = run_module(["-m", "ppdreambooth.generate", "--model", tiny_sd3_model, "--prompt",
                         "A photo of sks dog in a bucket", "--num_images", "1", "--steps", "2", "--seed", "0",
                         "--out", str(base)])
    assert result.returncode == 0, result.stderr[-3000:]
    base_image = np.asarray(__import__("PIL.Image").Image.open(
        next(base / n for n in os.listdir(base) if n.startswith("00-"))), dtype=np.int16)
    validation = np.asarray(__import__("PIL.Image").Image.open(out / "validation" / "step-3" / "image-0.png"),
                            dtype=np.int16)
    assert np.abs(images["0"] - base_image).max() <= 1
    assert np.abs(images["1"] - validation).max() <= 1
    assert np.abs(images["1"] - base_image).max() > 2  # the adapters change the image


def test_sd3_full_fine_tune_with_every_feature(tiny_sd3_model, tmp_path):
    """Two concepts with captions and SD3-generated class images, buckets (multiples of 16), cached latents,
    CLIP encoders trained, EMA, gradient checkpointing, the instance velocity error falls."""
    concepts, dog = two_concepts(tmp_path)
    out = tmp_path / "out"
    argv = ["-m", "ppdreambooth.train", "--pretrained_model_name_or_path", tiny_sd3_model, "--output_dir", str(out),
            "--concepts", json.dumps(concepts), "--with_prior_preservation", "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--cache_latents", "--train_batch_size", "1", "--learning_rate", "1e-3", "--max_train_steps", "6",
            "--train_text_encoder", "--use_ema", "--ema_decay", "0.5", "--gradient_checkpointing",
            "--validation_prompt", "a photo of sks dog", "--validation_steps", "6", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--class_image_inference_steps", "2", "--sample_batch_size", "2",
            "--report_to", "none", "--seed", "3", "--logging_steps", "1", "--weighting_scheme", "mode"]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "cls")) == 2 and len(os.listdir(tmp_path / "cls2")) == 2
    assert (out / "validation" / "step-6" / "image-0.png").is_file() and ", prior " in result.stdout
    card = (out / "README.md").read_text()
    assert "sd3" in card and "stable-diffusion-3" in card
    for name in ("text_encoder", "text_encoder_2"):
        a, b = load_file(str(out / name / "model.safetensors")), load_file(f"{tiny_sd3_model}/{name}/model.safetensors")
        assert any(not np.array_equal(a[k], b[k]) for k in b), name
    assert velocity_error(str(out), dog) < velocity_error(tiny_sd3_model, dog)


def velocity_error(model_dir, photos):
    """The transformer's velocity MSE on the instance photos (latent means, fixed noise, sigmas 0.2..0.8)."""
    import paddle

    from ppdreambooth.config.arguments import ModelArguments
    from ppdreambooth.data.images import list_image_files, load_rgb, prepare_image
    from ppdreambooth.modeling.build import build_model

    with paddle.utils.unique_name.guard():
        model = build_model(ModelArguments(pretrained_model_name_or_path=model_dir))
    model.eval()
    pixels = np.stack([prepare_image(load_rgb(p), (64, 64), True, False) for p in list_image_files(photos)])
    tokens = model.tokenize("a photo of sks dog")
    tokens = {k: paddle.to_tensor(np.stack([v] * len(pixels))) for k, v in tokens.items()}
    errors = []
    with paddle.no_grad():
        mean, _ = model.latent_moments(paddle.to_tensor(pixels))
        x0 = (mean - model.shift_factor) * model.scaling_factor
        noise = paddle.to_tensor(np.random.RandomState(0).standard_normal(x0.shape).astype("float32"))
        cond = model.encode_prompts(tokens)
        for sigma in (0.2, 0.4, 0.6, 0.8):
            t = paddle.full([len(pixels)], sigma * 1000, dtype="float32")
            v = model.family.predict(model.transformer, (1 - sigma) * x0 + sigma * noise, t, cond)
            errors.append(float(((v - (noise - x0)) ** 2).mean()))
    return float(np.mean(errors))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sd3_resume_equals_an_uninterrupted_run(tiny_sd3_model, photos, tmp_path, lora):
    extra = ["--random_flip", "--checkpointing_steps", "2"] + (["--use_lora"] if lora else [])
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_sd3_model, photos, full, steps=5, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    output = "paddle_lora_weights.safetensors" if lora else TRANSFORMER
    reference = load_file(str(full / output))
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_sd3_model, photos, resumed, steps=5, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_file(str(resumed / output))
    assert reference.keys() == again.keys() and all(np.array_equal(reference[k], again[k]) for k in reference)
