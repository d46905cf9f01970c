"""Single-file checkpoints without the PyTorch client: a Paddle-only write -> read round trip for SD and SDXL,
and SD 2.x's OpenCLIP layout refused both ways instead of loaded wrong."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ppdreambooth.errors import ConfigError
from ppdreambooth.interop.single_file import read_single_file, write_single_file

WEIGHTS = {"unet": "diffusion_paddle_model.safetensors", "vae": "diffusion_paddle_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_write_then_read_gives_back_every_weight(family, tiny_model, tiny_sdxl_model, tmp_path):
    model = tiny_model if family == "sd" else tiny_sdxl_model
    path = write_single_file(model, str(tmp_path / "model.safetensors"))
    read_single_file(path, model, str(tmp_path / "back"))
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        original = load_file(os.path.join(model, name, WEIGHTS[name]))
        again = load_file(str(tmp_path / "back" / name / WEIGHTS[name]))
        assert original.keys() == again.keys(), name
        assert all(np.array_equal(original[k], again[k]) for k in original), name


def test_sd2_open_clip_layout_is_refused_both_ways(tiny_model, tmp_path):
    sd2 = tmp_path / "sd2-like"
    shutil.copytree(tiny_model, sd2)
    config_path = sd2 / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_act": "gelu"}))  # OpenCLIP's activation, as SD 2.x has
    with pytest.raises(ConfigError, match="SD 2.x single files hold an OpenCLIP text encoder"):
        write_single_file(str(sd2), str(tmp_path / "sd2.safetensors"))
    assert not os.path.exists(tmp_path / "sd2.safetensors")

    # a file whose text encoder is in OpenCLIP layout (no cond_stage_model.transformer.*) is not loaded half
    state = load_file(write_single_file(tiny_model, str(tmp_path / "sd1.safetensors")))
    open_clip = {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in state.items()}
    save_file(open_clip, str(tmp_path / "openclip.safetensors"))
    with pytest.raises(ConfigError, match="OpenCLIP"):
        read_single_file(str(tmp_path / "openclip.safetensors"), tiny_model, str(tmp_path / "out"))


@pytest.mark.slow
def test_training_from_a_single_file_records_the_file_the_user_named(tiny_model, photos, tmp_path):
    from helpers.runs import run_module, train_argv

    path = write_single_file(tiny_model, str(tmp_path / "model.safetensors"))
    out = tmp_path / "out"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(path, photos, out, steps=1),
                         "--single_file_config", tiny_model])
    assert result.returncode == 0, result.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert f"base_model: {path}" in card and ".base-from-single-file" not in card.split("## Use")[0]
