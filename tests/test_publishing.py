"""What leaves the machine: the model card's content, and the hub upload's filter (no checkpoints, no logs)."""
import os

import pytest

from ppdreambooth.config.parsing import parse_args
from ppdreambooth.families import FAMILIES
from ppdreambooth.interop.model_card import closing_summary, write_model_card


def card_for(tmp_path, family, extra):
    out = tmp_path / "out"
    os.makedirs(out / "validation" / "step-4")
    (out / "validation" / "step-4" / "image-0.png").write_bytes(b"png")
    argv = ["--pretrained_model_name_or_path", "org/base", "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
            "--max_train_steps", "4", "--validation_prompt", "a dog in a bucket", "--report_to", "none", *extra]
    model_args, data_args, args = parse_args(argv)
    path = write_model_card(str(out), model_args, data_args, args, 4, FAMILIES[family])
    return open(path, encoding="utf-8").read(), closing_summary(str(out), model_args, args, "cached x", FAMILIES[family])


def test_model_card_records_the_run_and_how_to_load_it(tmp_path):
    card, summary = card_for(tmp_path, "sd", ["--use_lora", "--lora_rank", "8", "--with_prior_preservation",
                                              "--class_data_dir", str(tmp_path / "c"), "--class_prompt", "a dog"])
    assert "base_model: org/base" in card and "model family `sd`" in card and "tags: [stable-diffusion" in card
    assert "LoRA (rank 8, alpha 8)" in card and "`a photo of sks dog`" in card and "class prompt `a dog`" in card
    assert "steps 4" in card and "prior preservation on" in card
    assert "load in plain ppdiffusers" in card and "validation/step-4/image-0.png" in card
    assert "caching:     cached x" in summary and "loading:     plain ppdiffusers" in summary

    card, summary = card_for(tmp_path / "te", "sdxl", ["--use_lora", "--train_text_encoder"])
    assert "tags: [stable-diffusion-xl" in card and "text encoders trained" in card
    assert "peft backend" in card and "--format merged" in card and "--format merged" in summary

    card, _ = card_for(tmp_path / "full", "sd3", [])
    assert "full fine-tuning" in card and "stable-diffusion-3" in card and "--lora" not in card


def test_hub_upload_leaves_checkpoints_logs_and_hidden_files_behind(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import filter_repo_objects

    from ppdreambooth.interop.hub import push_to_hub

    out = tmp_path / "out"
    for name in ("model_index.json", "README.md", "unet/diffusion_paddle_model.safetensors",
                 "checkpoint-2/model_state.pdparams", "checkpoint-2/.complete", "logs/vdlrecords.log",
                 ".base-from-single-file/model_index.json", "paddle_lora_weights.safetensors",
                 "validation/step-4/image-0.png"):
        os.makedirs(os.path.dirname(out / name), exist_ok=True)
        (out / name).write_text("x")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok):
            return type("Repo", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push_to_hub(str(out)) == "me/out"
    files = [os.path.relpath(os.path.join(root, f), out) for root, _, names in os.walk(out) for f in names]
    uploaded = set(filter_repo_objects(files, ignore_patterns=calls["ignore_patterns"]))
    assert uploaded == {"model_index.json", "README.md", "unet/diffusion_paddle_model.safetensors",
                        "paddle_lora_weights.safetensors", "validation/step-4/image-0.png"}
