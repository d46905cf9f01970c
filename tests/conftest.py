"""Shared fixtures: a tiny random Stable Diffusion folder and a few subject photos, made in the test run."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs training in subprocesses (seconds to a minute); CI runs it")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from ppdreambooth.families.tiny import build_tiny_pipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny-sd")
    build_tiny_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory):
    from ppdreambooth.families.tiny import build_tiny_pipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny-sd-v")
    build_tiny_pipeline(path, seed=0, prediction_type="v_prediction")
    return path


def write_photos(folder, count=4, size=(96, 80), seed=0):
    """Non-square random photos: a 64 px training crop from them is really random."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(
            os.path.join(folder, f"photo-{i}.png")
        )
    return str(folder)


def two_concepts(tmp_path):
    """Two subjects with non-square photos (a caption on one) and class folders of 2 images each:
    (the `concepts` list, the first subject's photo folder)."""
    dog = write_photos(tmp_path / "dog", count=3, size=(96, 64))
    cat = write_photos(tmp_path / "cat", count=2, size=(64, 96), seed=1)
    with open(os.path.join(dog, "photo-0.txt"), "w") as f:
        f.write("{instance_prompt} on a sofa")
    concepts = [
        {"instance_data_dir": dog, "instance_prompt": "a photo of sks dog", "class_data_dir": str(tmp_path / "cls"),
         "class_prompt": "a photo of dog", "num_class_images": 2},
        {"instance_data_dir": cat, "instance_prompt": "a photo of zwx cat", "class_data_dir": str(tmp_path / "cls2"),
         "class_prompt": "a photo of cat", "num_class_images": 2},
    ]
    return concepts, dog


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "instance")


def run_module(args, cwd=ROOT, env=None, timeout=600):
    """Run `python <args>` in a fresh process; returns the CompletedProcess (output captured)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def torch_python():
    """The PyTorch + diffusers client's Python (tests/run.sh prepares it); its tests skip without it."""
    python = os.environ.get("PPDB_TORCH_PYTHON")
    if not python:
        pytest.skip("PPDB_TORCH_PYTHON is not set (bash tests/run.sh prepares the PyTorch client)")
    return python


def client(torch_python, *args):
    """Run tests/helpers/diffusers_client.py in the PyTorch client (it never imports Paddle)."""
    script = os.path.join(ROOT, "tests", "helpers", "diffusers_client.py")
    result = subprocess.run([torch_python, script, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def train_argv(model, photos, out, steps=4, extra=()):
    return [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", photos, "--output_dir", str(out),
        "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--train_batch_size", "1",
        "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--logging_steps", "1", "--seed", "7",
        "--report_to", "none", *extra,
    ]


def truncate_run_to(run_dir, step, dest):
    """A copy of a finished run as it stood right after `checkpoint-<step>` was written."""
    import shutil

    shutil.copytree(run_dir, dest)
    for name in os.listdir(dest):
        path = os.path.join(dest, name)
        keep = name.startswith("checkpoint-") and int(name.split("-")[1]) <= step
        if not keep and name != "logs":
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def load_unet_weights(folder):
    """UNet weights of a saved pipeline folder, as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_paddle_model.safetensors"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    from ppdreambooth.families.tiny import build_tiny_pipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    build_tiny_pipeline(path, seed=0, family="sdxl")
    return path


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory):
    """A tiny SD3 with CLIP-L, CLIP-G and a tiny T5."""
    from ppdreambooth.families.tiny import build_tiny_pipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny-sd3")
    build_tiny_pipeline(path, seed=0, family="sd3")
    return path


TINY_MODEL_FIXTURES = {"sd": "tiny_model", "sdxl": "tiny_sdxl_model", "sd3": "tiny_sd3_model"}


@pytest.fixture(params=list(TINY_MODEL_FIXTURES))
def family_model(request):
    """(family name, tiny model folder), for the behavioural tests that every family must pass."""
    return request.param, request.getfixturevalue(TINY_MODEL_FIXTURES[request.param])
