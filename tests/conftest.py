"""Shared fixtures: a tiny random Stable Diffusion folder and a few subject photos, made in the test run."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from helpers.photos import write_photos  # noqa: E402


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model weights are loaded (inputs must be refused before that)."""
    from ppdreambooth.families.base import ModelFamily

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("ppdreambooth.modeling.build.load_components", refuse)
    monkeypatch.setattr(ModelFamily, "load_pipeline", refuse)


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


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "instance")


@pytest.fixture(scope="session")
def torch_python():
    """The PyTorch + diffusers client's Python (tests/run.sh prepares it); its tests skip without it."""
    python = os.environ.get("PPDB_TORCH_PYTHON")
    if not python:
        pytest.skip("PPDB_TORCH_PYTHON is not set (bash tests/run.sh prepares the PyTorch client)")
    return python


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
