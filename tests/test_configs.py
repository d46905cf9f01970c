"""Every shipped JSON config parses, with the values it states."""
import glob
import json
import os

import pytest

from helpers.runs import ROOT
from ppdreambooth.config.parsing import parse_args

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def test_there_are_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"demo.json", "sd15_full.json", "sd15_full_prior.json", "sd2_768_full.json", "sd15_lora.json",
            "sd2_768_lora.json", "sd15_two_concepts.json", "sdxl_lora.json", "sdxl_full.json", "sd3_lora.json", "sd3_full.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data, args = parse_args([path])
    raw = json.load(open(path))
    assert model.pretrained_model_name_or_path == raw["pretrained_model_name_or_path"]
    assert data.image_size == (raw["resolution"], raw["resolution"])
    assert len(data.concept_list) == len(raw.get("concepts", [])) + ("instance_data_dir" in raw)
    assert args.max_steps == raw["max_train_steps"]
    assert data.with_prior_preservation == raw.get("with_prior_preservation", False)
    assert model.use_lora == raw.get("use_lora", False)
    if model.use_lora:
        assert model.lora_rank == raw["lora_rank"] and args.validation_prompt == raw["validation_prompt"]
