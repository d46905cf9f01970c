"""Argument parsing: JSON + CLI override, the seed's flag names and defaults, aliases, errors that name the key."""
import importlib.util
import json
import shlex

import pytest

from ppdreambooth.errors import ConfigError
from ppdreambooth.config.parsing import parse_args

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog"]

# The seed README's single-GPU command (part 1.2.2), verbatim after `python -u train_dreambooth.py`.
SEED_COMMAND = """--pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4 --instance_data_dir=./dream_image
  --output_dir=./dream_outputs --instance_prompt="a photo of sks dog" --resolution=512 --train_batch_size=1
  --gradient_accumulation_steps=1 --learning_rate=5e-6 --lr_scheduler="constant" --lr_warmup_steps=0
  --max_train_steps=400"""
SEED_PRIOR_COMMAND = """--pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4 --instance_data_dir=./dream_image
  --class_data_dir=./dream_class_image --output_dir=./dream_outputs_with_class --with_prior_preservation
  --prior_loss_weight=1.0 --instance_prompt="a photo of sks dog" --class_prompt="a photo of dog" --resolution=512
  --train_batch_size=1 --gradient_accumulation_steps=1 --learning_rate=5e-6 --lr_scheduler="constant"
  --lr_warmup_steps=0 --num_class_images=200 --max_train_steps=800"""


def parse(*argv, tmp_path=None):
    return parse_args(list(argv))


def test_seed_command_parses_with_seed_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data, args = parse_args(shlex.split(SEED_COMMAND))
    assert model.pretrained_model_name_or_path == "CompVis/stable-diffusion-v1-4"
    assert data.instance_prompt == "a photo of sks dog" and data.image_size == (512, 512)
    assert args.per_device_train_batch_size == 1 and args.max_steps == 400
    assert args.learning_rate == 5e-6 and args.lr_scheduler_type.value == "constant" and args.warmup_steps == 0
    assert args.output_dir == "./dream_outputs"
    model, data, args = parse_args(shlex.split(SEED_PRIOR_COMMAND))
    assert data.with_prior_preservation and data.num_class_images == 200 and data.class_prompt == "a photo of dog"
    assert model.prior_loss_weight == 1.0 and args.max_steps == 800


def test_defaults_follow_the_seed_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data, args = parse_args(REQUIRED)
    assert model.noise_offset == 0.0 and model.snr_gamma is None and not model.train_text_encoder
    assert args.max_grad_norm == 1.0 and args.weight_decay == 1e-2 and args.decay_bias_and_norm
    assert args.adam_beta1 == 0.9 and args.adam_beta2 == 0.999 and args.adam_epsilon == 1e-8
    assert args.lr_scheduler_type.value == "constant" and args.num_train_epochs == 1
    assert args.per_device_train_batch_size == 4 and args.warmup_steps == 500 and args.save_steps == 500
    assert args.report_to == ["visualdl"] and args.seed == 42
    assert args.output_dir == "dreambooth-model"
    assert args.logging_dir == "dreambooth-model/logs"  # joined with output_dir, as the seed says
    assert data.num_class_images == 100 and data.sample_batch_size == 4 and data.resolution == 512
    assert not data.center_crop and not data.random_flip and data.height is None and data.width is None
    assert not args.recompute and not args.enable_xformers_memory_efficient_attention


def test_json_with_cli_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "x.json"
    cfg.write_text(json.dumps({
        "pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "p",
        "max_train_steps": 50, "random_flip": True, "report_to": ["visualdl", "tensorboard"][:1],
        "snr_gamma": None, "height": 64, "width": 128,
    }))
    model, data, args = parse_args([str(cfg), "--max_train_steps", "10", "--center_crop"])
    assert args.max_steps == 10  # the command line wins
    assert data.random_flip and data.center_crop and data.image_size == (64, 128)
    assert model.snr_gamma is None  # null means "keep the default"


def test_aliases_are_one_setting_and_conflicts_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, args = parse_args(REQUIRED + ["--train_batch_size", "2", "--checkpointing_steps", "7",
                                        "--checkpoints_total_limit", "3", "--adam_weight_decay", "0.5",
                                        "--gradient_checkpointing", "--lr_warmup_steps", "5"])
    assert args.per_device_train_batch_size == 2 and args.save_steps == 7 and args.save_total_limit == 3
    assert args.weight_decay == 0.5 and args.recompute and args.warmup_steps == 5
    _, _, args = parse_args(REQUIRED + ["--train_batch_size", "2", "--per_device_train_batch_size", "2"])
    assert args.per_device_train_batch_size == 2  # same value twice is fine
    with pytest.raises(ConfigError, match="train_batch_size 2 and --per_device_train_batch_size 3"):
        parse_args(REQUIRED + ["--train_batch_size", "2", "--per_device_train_batch_size", "3"])
    with pytest.raises(ConfigError, match="max_train_steps"):
        parse_args(REQUIRED + ["--max_train_steps", "2", "--max_steps", "3"])
    _, _, args = parse_args(REQUIRED + ["--train_text_encoder", "--text_encoder_lr", "5e-6"])  # SDXL script's name
    assert args.text_encoder_learning_rate == 5e-6


def test_mixed_precision_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, args = parse_args(REQUIRED + ["--mixed_precision", "no"])
    assert not args.fp16 and not args.bf16
    with pytest.raises(ConfigError, match="mixed_precision"):
        parse_args(REQUIRED + ["--mixed_precision", "bf16", "--fp16", "true"])


def test_unknown_keys_are_named_with_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown flag 'max_train_step'.*'max_train_steps'"):
        parse_args(REQUIRED + ["--max_train_step", "3"])
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"instance_promt": "x"}))
    with pytest.raises(ConfigError, match=r"bad.json.*'instance_promt'.*'instance_prompt'"):
        parse_args([str(cfg)])
    with pytest.raises(ConfigError, match="unknown flag 'lora'"):  # no silent prefix matching
        parse_args(REQUIRED + ["--lora", "3"])


def test_wrong_types_and_bad_values_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="max_train_steps.*invalid int value: 'ten'"):
        parse_args(REQUIRED + ["--max_train_steps", "ten"])
    with pytest.raises(ConfigError, match="--resolution must be a positive multiple of 8"):
        parse_args(REQUIRED + ["--resolution", "500"])
    with pytest.raises(ConfigError, match="--height must be a positive multiple of 8"):
        parse_args(REQUIRED + ["--height", "-8"])
    with pytest.raises(ConfigError, match="--with_prior_preservation needs --class_data_dir and --class_prompt"):
        parse_args(REQUIRED + ["--with_prior_preservation"])
    with pytest.raises(ConfigError, match="lr_scheduler.*invalid choice"):
        parse_args(REQUIRED + ["--lr_scheduler", "cosine_with_bumps"])
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path is required"):
        parse_args(["--instance_data_dir", "d", "--instance_prompt", "p"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args([str(tmp_path / "missing.json")])


def test_scale_lr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, args = parse_args(REQUIRED + ["--learning_rate", "1e-6", "--scale_lr", "--train_batch_size", "2",
                                        "--gradient_accumulation_steps", "3"])
    assert args.learning_rate == pytest.approx(6e-6)  # x accumulation x batch x 1 process


def test_tensorboard_needs_tensorboardx(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("paddle")
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboardX"):
            parse_args(REQUIRED + ["--report_to", "tensorboard"])
    else:
        _, _, args = parse_args(REQUIRED + ["--report_to", "tensorboard"])
        assert args.report_to == ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:  # the SDXL README's --report_to wandb: a clear early stop
        with pytest.raises(ConfigError, match="--report_to wandb needs the wandb package: pip install wandb"):
            parse_args(REQUIRED + ["--report_to", "wandb"])
    with pytest.raises(ConfigError, match="--report_to 'wandbx' is not supported"):
        parse_args(REQUIRED + ["--report_to", "wandbx"])
    _, _, args = parse_args(REQUIRED + ["--report_to", "none"])
    assert args.report_to == []


def test_cache_latents_refuses_random_crops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--cache_latents cannot reproduce random crops.*--center_crop"):
        parse_args(REQUIRED + ["--cache_latents"])
    _, data, _ = parse_args(REQUIRED + ["--cache_latents", "--center_crop", "--random_flip"])
    assert data.cache_latents
    with pytest.raises(ConfigError, match="--cache_latents and --no_cache_latents contradict"):
        parse_args(REQUIRED + ["--cache_latents", "--center_crop", "--no_cache_latents"])
    _, data, _ = parse_args(REQUIRED + ["--no_cache_latents"])
    assert data.no_cache_latents and not data.cache_latents


def test_lora_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _, args = parse_args(REQUIRED + ["--use_lora", "--lora_rank", "8"])
    assert model.use_lora and model.lora_rank == 8 and model.lora_alpha == 8.0  # alpha defaults to the rank
    assert args.learning_rate == 1e-4  # LoRA's default rate when none is given
    model, _, args = parse_args(REQUIRED + ["--use_lora", "--rank", "16", "--lora_alpha", "8", "--learning_rate", "3e-4"])
    assert model.lora_rank == 16 and model.lora_alpha == 8.0 and args.learning_rate == 3e-4
    with pytest.raises(ConfigError, match="--rank 16 and --lora_rank 8"):
        parse_args(REQUIRED + ["--rank", "16", "--lora_rank", "8"])
    with pytest.raises(ConfigError, match="--lora_rank 0 is out of range: it must be an integer >= 1"):
        parse_args(REQUIRED + ["--use_lora", "--lora_rank", "0"])
    with pytest.raises(ConfigError, match="--validation_epochs 0 is out of range"):
        parse_args(REQUIRED + ["--validation_epochs", "0"])
    _, _, args = parse_args(REQUIRED + ["--validation_prompt", "a photo of sks dog", "--validation_epochs", "50"])
    assert args.num_validation_images == 4 and args.validation_epochs == 50


def test_export_formats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, args = parse_args(REQUIRED + ["--use_lora", "--export_formats", "diffusers,kohya"])
    assert args.export_formats == "diffusers,kohya"
    with pytest.raises(ConfigError, match="unknown format 'onnx'"):
        parse_args(REQUIRED + ["--export_formats", "diffusers,onnx"])
    with pytest.raises(ConfigError, match="kohya exports LoRA adapters; it needs --use_lora"):
        parse_args(REQUIRED + ["--export_formats", "kohya"])


def test_numbers_in_a_concepts_list_are_checked_by_the_same_table():
    concepts = '[{"instance_data_dir": "p", "instance_prompt": "a sks dog", "num_class_images": -3}]'
    with pytest.raises(ConfigError, match=r"concepts\[0\].num_class_images -3 is out of range: it must be an integer >= 0"):
        parse_args(["--pretrained_model_name_or_path", "org/model", "--output_dir", "o", "--concepts", concepts])
