"""Entry points: clear early errors (exit 2, no traceback, no model loaded), run_train.sh, prior preservation."""
import gc
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from helpers.runs import ROOT, run_module, train_argv
from ppdreambooth import train


def error_of(argv, capsys):
    code = train.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert gc.get_freeze_count() == 0  # objects frozen for the run are handed back to the collector
    return err


def test_bad_inputs_fail_early_with_a_named_cause(tiny_model, photos, tmp_path, capsys, no_model_loading):
    out = str(tmp_path / "out")
    base = train_argv(tiny_model, photos, out)

    def with_(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    assert "--instance_data_dir" in error_of(with_("--instance_data_dir", str(tmp_path / "nope")), capsys)
    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("hi")
    assert "holds no usable image" in error_of(with_("--instance_data_dir", str(only_text)), capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    assert "a.jpg is empty" in error_of(with_("--instance_data_dir", str(broken)), capsys)

    no_vae = tmp_path / "no_vae"
    shutil.copytree(tiny_model, no_vae)
    shutil.rmtree(no_vae / "vae")
    assert "lacks vae/" in error_of(with_("--pretrained_model_name_or_path", str(no_vae)), capsys)
    assert "unknown flag 'instance_promt'" in error_of(base + ["--instance_promt", "x"], capsys)
    assert "--class_prompt" in error_of(base + ["--with_prior_preservation", "--class_data_dir", out], capsys)
    assert "memory-efficient attention" in error_of(base + ["--enable_xformers_memory_efficient_attention"], capsys)
    assert "not a complete checkpoint" in error_of(base + ["--resume_from_checkpoint", out], capsys)

    os.makedirs(out)
    (tmp_path / "out" / "model_index.json").write_text("{}")
    assert "already holds a finished model" in error_of(base, capsys)
    assert json.loads((tmp_path / "out" / "model_index.json").read_text()) == {}  # untouched
    lora_out = tmp_path / "lora_out"
    lora_out.mkdir()
    (lora_out / "paddle_lora_weights.safetensors").write_bytes(b"mine")
    assert "already holds a finished model" in error_of(with_("--output_dir", str(lora_out)) + ["--use_lora"], capsys)
    assert (lora_out / "paddle_lora_weights.safetensors").read_bytes() == b"mine"


def test_a_corrupt_image_is_skipped_with_a_warning(photos, tmp_path, caplog):
    from ppdreambooth.data.photos import collect_photos

    (tmp_path / "instance" / "zz-truncated.png").write_bytes(open(os.path.join(photos, "photo-0.png"), "rb").read()[:60])
    files = collect_photos(photos, "instance_data_dir")
    assert len(files) == 4 and "zz-truncated.png" in caplog.text


@pytest.mark.slow
def test_error_in_a_real_process_has_no_traceback(tmp_path):
    result = run_module(["-m", "ppdreambooth.train", "--pretrained_model_name_or_path", str(tmp_path),
                         "--instance_data_dir", str(tmp_path / "missing"), "--instance_prompt", "x"])
    assert result.returncode == 2
    assert "ppdreambooth: error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_train_sh_with_json_config_and_override(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "pretrained_model_name_or_path": tiny_model, "instance_data_dir": photos, "output_dir": str(out),
        "instance_prompt": "a photo of sks dog", "resolution": 64, "max_train_steps": 50, "report_to": "none",
        "checkpointing_steps": 1, "logging_steps": 1,
    }))
    result = subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), str(cfg), "--max_train_steps", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
def test_seed_prior_preservation_command(tiny_model, photos, tmp_path):
    class_dir = tmp_path / "dream_class_image"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(class_dir / "my-dog.png")
    mine = (class_dir / "my-dog.png").read_bytes()
    out = tmp_path / "dream_outputs_with_class"
    # The seed README's prior-preservation command, with a local tiny model, 3 class images and 2 steps.
    argv = ["-u", "-m", "ppdreambooth.train", f"--pretrained_model_name_or_path={tiny_model}",
            f"--instance_data_dir={photos}", f"--class_data_dir={class_dir}", f"--output_dir={out}",
            "--with_prior_preservation", "--prior_loss_weight=1.0", "--instance_prompt=a photo of sks dog",
            "--class_prompt=a photo of dog", "--resolution=64", "--train_batch_size=1",
            "--gradient_accumulation_steps=1", "--learning_rate=5e-6", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--num_class_images=3", "--max_train_steps=2",
            "--sample_batch_size=2", "--class_image_inference_steps=2", "--logging_steps=1"]
    result = run_module(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(class_dir)) == ["class-00000.png", "class-00001.png", "my-dog.png"]
    assert (class_dir / "my-dog.png").read_bytes() == mine
    assert ", prior " in result.stdout  # the console line of each logging step carries both loss parts
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
def test_entry_files_run_as_scripts(tiny_model, photos, tmp_path):
    """`python <site-packages>/ppdreambooth/train_lora.py ...` (what paddle.distributed.launch does with a file)
    works from any folder: the file runs the package's module instead of failing on relative imports."""
    out = tmp_path / "out"
    result = run_module([os.path.join(ROOT, "ppdreambooth", "train_lora.py"),
                         *train_argv(tiny_model, photos, out, steps=1)], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "paddle_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_a_seed_run_prints_a_screenful_with_the_loss(tiny_model, photos, tmp_path):
    """The console reads like a CLI: header, progress, losses, checkpoints, summary; the rest goes to train.log."""
    out = tmp_path / "out"
    result = run_module(["-u", "-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=4,
                                                                          extra=["--checkpointing_steps", "2"])])
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    lines = [line for line in console.replace("\r", "\n").split("\n") if line.strip() and "TrainProcess" not in line]
    assert len(lines) <= 30, "\n".join(lines)
    assert "ppdreambooth: full fine-tuning of" in console and "step 4/4: loss " in console
    assert "checkpoint-2 written" in console and "Training finished." in console
    assert "Loading weights file" not in console and "UserWarning" not in console
    log = (out / "train.log").read_text()
    assert "Loading weights file" in log and "loss_instance" in log  # everything else, kept in the file
    assert "caching:     cached 1 prompt embedding(s), latents of 0 of 4 image crops" in console  # random crops
    verbose = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, tmp_path / "verbose", steps=1,
                                                                  extra=["--log_level", "info", "--center_crop",
                                                                         "--no_cache_latents"])])
    assert "Loading weights file" in verbose.stdout + verbose.stderr
    assert "caching:     cached 1 prompt embedding(s)\n" in verbose.stdout  # centre crops, yet no latent cache


def test_exit_process_keeps_the_status_output_and_exit_handlers(tmp_path):
    """The commands end through exiting.exit_process (no final sweep of every object): the exit status,
    buffered output, logging handlers and atexit functions still come through."""
    log = tmp_path / "run.log"
    code = ("import atexit, logging, sys\n"
            f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
            "logging.getLogger('x').info('logged line')\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "sys.stdout.write('buffered ')\n"
            "from ppdreambooth.runtime.exiting import exit_process\n"
            "exit_process(3)\n")
    result = run_module(["-c", code])
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered atexit ran\n"
    assert "logged line" in log.read_text()
