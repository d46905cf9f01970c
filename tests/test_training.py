"""End-to-end training in fresh processes: the seed's command lines, checkpoints, output folder, resume."""
import os

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from helpers.models import load_unet_weights
from helpers.runs import run_module, train_argv, truncate_run_to

pytestmark = pytest.mark.slow


def read_component(folder, name):
    files = {"unet": "diffusion_paddle_model.safetensors", "vae": "diffusion_paddle_model.safetensors",
             "text_encoder": "model.safetensors"}
    return load_file(os.path.join(folder, name, files[name]))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_seed_command_trains_checkpoints_and_writes_a_loadable_pipeline(tiny_model, photos, tmp_path):
    out = tmp_path / "dream_outputs"
    # The seed README's command (1.2.2) with a local tiny model, 64 px and 4 steps instead of 400.
    argv = ["-u", "-m", "ppdreambooth.train", f"--pretrained_model_name_or_path={tiny_model}",
            f"--instance_data_dir={photos}", f"--output_dir={out}", "--instance_prompt=a photo of sks dog",
            "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=4",
            "--checkpointing_steps=2", "--checkpoints_total_limit=1", "--report_to=visualdl"]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]

    for name in ("vae", "text_encoder", "unet", "scheduler", "tokenizer"):
        assert os.path.isdir(out / name), name
    assert (out / "model_index.json").is_file()
    assert (out / "unet" / "diffusion_paddle_model.safetensors").is_file()
    assert [d for d in os.listdir(out) if d.startswith("checkpoint")] == ["checkpoint-4"]  # total limit 1
    assert os.listdir(out / "logs"), "VisualDL logs"

    ckpt = paddle.load(str(out / "checkpoint-4" / "model_state.pdparams"))
    assert ckpt and all(k.startswith("unet.") for k in ckpt)  # trained weights only, no frozen VAE/text encoder
    for name in ("optimizer.pdopt", "scheduler.pdparams", "rng_state.pth", "trainer_state.json", ".complete"):
        assert (out / "checkpoint-4" / name).is_file(), name

    # frozen parts bit-identical, the UNet changed
    assert_same(read_component(str(out), "vae"), read_component(tiny_model, "vae"))
    assert_same(read_component(str(out), "text_encoder"), read_component(tiny_model, "text_encoder"))
    trained, base = load_unet_weights(str(out)), load_unet_weights(tiny_model)
    assert any(not np.array_equal(trained[k], base[k]) for k in base)
    # the checkpoint holds the same UNet as the final output
    key = "conv_in.weight"
    assert np.array_equal(ckpt["unet." + key].numpy(), trained[key])

    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    image = pipe("A photo of sks dog in a bucket", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_train_text_encoder(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2,
                                                                  extra=["--train_text_encoder"])])
    assert result.returncode == 0, result.stderr[-3000:]
    te, base = read_component(str(out), "text_encoder"), read_component(tiny_model, "text_encoder")
    assert any(not np.array_equal(te[k], base[k]) for k in base)
    assert_same(read_component(str(out), "vae"), read_component(tiny_model, "vae"))


def test_resume_equals_an_uninterrupted_run(tiny_model, photos, tmp_path):
    # random crops (80x96 photos, 64 px crops) and flips, linear LR decay, 4 photos = 4 steps per epoch
    extra = ["--random_flip", "--lr_scheduler", "linear", "--checkpointing_steps", "2"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=6, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instance " in result.stdout and ", prior" not in result.stdout  # the instance part, no prior part
    assert "loss_instance" in (full / "train.log").read_text()  # the Trainer's own log lines: in the log file
    reference = load_unet_weights(str(full))

    # "latest" picks checkpoint-4 (an epoch boundary); an explicit path resumes mid-epoch from checkpoint-2
    for step, resume in ((4, "latest"), (2, "checkpoint-2")):
        resumed = tmp_path / f"resumed-{step}"
        truncate_run_to(str(full), step, str(resumed))
        target = resume if resume == "latest" else str(resumed / resume)
        result = run_module(["-m", "ppdreambooth.train",
                             *train_argv(tiny_model, photos, resumed, steps=6,
                                         extra=extra + ["--resume_from_checkpoint", target])])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"global step {step}" in result.stderr + result.stdout
        assert_same(load_unet_weights(str(resumed)), reference)


def test_resume_latest_without_checkpoint_starts_fresh(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_model, photos, out, steps=1, extra=["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting a new run" in result.stderr + result.stdout


def test_bf16_autocast_trains_and_saves_float32(tiny_model, photos, tmp_path):
    """bf16 O1 runs on a CPU too; the saved UNet stays float32 (weights are fp32 under O1)."""
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2,
                                                                  extra=["--mixed_precision", "bf16"])])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_unet_weights(str(out))
    assert all(v.dtype == np.float32 for v in weights.values())
    assert any(not np.array_equal(weights[k], v) for k, v in load_unet_weights(tiny_model).items())
