"""SDXL end to end, in fresh processes: PaddleMIX's README command, full fine-tuning with every feature, resume."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from helpers.models import load_unet_weights
from helpers.photos import two_concepts
from helpers.runs import run_module, train_argv, truncate_run_to

pytestmark = pytest.mark.slow


def weights(folder, name, file="model.safetensors"):
    return load_file(os.path.join(folder, name, file))


def test_paddlemix_sdxl_lora_command_runs_unchanged(tiny_sdxl_model, photos, tmp_path):
    """README_sdxl's command with `python -m ppdreambooth.train_lora` in place of the script (and a tiny model,
    64 px, 4 steps, --mixed_precision no on a CPU)."""
    out = tmp_path / "lora-trained-xl"
    argv = ["-m", "ppdreambooth.train_lora", f"--pretrained_model_name_or_path={tiny_sdxl_model}",
            f"--instance_data_dir={photos}", f"--output_dir={out}", "--mixed_precision=no",
            "--instance_prompt=a photo of sks dog", "--resolution=64", "--train_batch_size=1",
            "--gradient_accumulation_steps=4", "--learning_rate=1e-4", "--report_to=wandb", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--max_train_steps=3", "--validation_prompt=A photo of sks dog in a bucket",
            "--validation_epochs=25", "--seed=0", "--checkpointing_steps=2", "--validation_inference_steps=2",
            "--num_validation_images=1"]
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        result = run_module(argv)
        assert result.returncode == 2 and "--report_to wandb needs the wandb package" in result.stderr
        assert not os.path.exists(out / "checkpoint-2")
        argv[argv.index("--report_to=wandb")] = "--report_to=visualdl"
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "paddle_lora_weights.safetensors").is_file() and (out / "checkpoint-2" / ".complete").is_file()
    saved = load_file(str(out / "paddle_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)

    # The README's inference: the base pipeline plus the file reproduces the final validation image.
    import paddle
    from ppdiffusers import DiffusionPipeline

    from ppdreambooth.families import get_family
    from ppdreambooth.inference.sampling import generate_images, prepare_for_sampling

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_model)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.load_lora_weights(str(out))
    prepare_for_sampling(pipe, get_family("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    image = generate_images(pipe, ["A photo of sks dog in a bucket"], [0], num_inference_steps=2)[0]
    validation = Image.open(out / "validation" / "step-3" / "image-0.png")
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(validation, dtype=np.int16)).max() <= 1
    del paddle


def test_sdxl_full_fine_tune_with_every_feature(tiny_sdxl_model, tmp_path):
    """Two concepts (one with captions and prior preservation from SDXL-generated class images), buckets over
    non-square photos, cached latents, both text encoders trained at their own rate, EMA, validation; the
    output is an SDXL pipeline folder; generate and the model card work on it."""
    concepts, dog = two_concepts(tmp_path)
    out = tmp_path / "out"
    argv = ["-m", "ppdreambooth.train", "--pretrained_model_name_or_path", tiny_sdxl_model, "--output_dir", str(out),
            "--concepts", json.dumps(concepts), "--with_prior_preservation", "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--cache_latents", "--train_batch_size", "1", "--learning_rate", "1e-3", "--max_train_steps", "4",
            "--train_text_encoder", "--text_encoder_learning_rate", "5e-4", "--use_ema", "--ema_decay", "0.9",
            "--validation_prompt", "a photo of sks dog", "--validation_steps", "4", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--class_image_inference_steps", "2", "--sample_batch_size", "2",
            "--report_to", "none", "--seed", "3", "--logging_steps", "1"]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "cls")) == 2 and len(os.listdir(tmp_path / "cls2")) == 2
    assert (out / "validation" / "step-4" / "image-0.png").is_file()
    assert ", prior " in result.stdout

    # frozen VAE bit-identical; UNet and both text encoders trained
    vae = "diffusion_paddle_model.safetensors"
    assert all(np.array_equal(v, weights(tiny_sdxl_model, "vae", vae)[k]) for k, v in weights(str(out), "vae", vae).items())
    unet, base = load_unet_weights(str(out)), load_unet_weights(tiny_sdxl_model)
    assert any(not np.array_equal(unet[k], base[k]) for k in base)
    for name in ("text_encoder", "text_encoder_2"):
        trained, before = weights(str(out), name), weights(tiny_sdxl_model, name)
        assert any(not np.array_equal(trained[k], before[k]) for k in before), name

    from ppdiffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert "sdxl" in (out / "README.md").read_text()

    samples = tmp_path / "samples"
    result = run_module(["-m", "ppdreambooth.generate", "--model", str(out), "--prompt", "a photo of sks dog",
                         "--num_images", "2", "--steps", "2", "--out", str(samples)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([n for n in os.listdir(samples) if n.endswith(".png")]) == 3  # two images and the grid


@pytest.mark.parametrize("mode", ["full", "lora", "full-adafactor"])
def test_sdxl_resume_equals_an_uninterrupted_run(tiny_sdxl_model, photos, tmp_path, mode):
    """Random crops and flips (their time ids included): resuming mid-epoch ends bit-identical, with AdamW
    and with `--optim adafactor` (whose state is in the checkpoint)."""
    lora = mode == "lora"
    extra = ["--random_flip", "--checkpointing_steps", "2"] + {
        "full": [], "lora": ["--use_lora", "--train_text_encoder"], "full-adafactor": ["--optim", "adafactor"]}[mode]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_sdxl_model, photos, full, steps=5, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    output = "paddle_lora_weights.safetensors" if lora else os.path.join("unet", "diffusion_paddle_model.safetensors")
    reference = load_file(str(full / output))
    if mode == "full-adafactor":
        import paddle

        state = paddle.load(str(full / "checkpoint-2" / "optimizer.pdopt"))
        assert any("_adafactor_exp_avg_sq_row" in k for k in state)  # factored moments, not AdamW's
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_sdxl_model, photos, resumed, steps=5, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    again = load_file(str(resumed / output))
    assert reference.keys() == again.keys()
    assert all(np.array_equal(reference[k], again[k]) for k in reference)
