"""`--optim adamw_8bit` through `ppdreambooth.train` in fresh processes: the tiny SD model fully fine-tuned with its
text encoder, and LoRA on the tiny SD, SDXL and SD3 models; 8-bit state where it belongs, exact resume."""
import numpy as np
import paddle
import pytest

from helpers.runs import run_module, train_argv, truncate_run_to

pytestmark = pytest.mark.slow


def _quantized_keys(run_dir, step):
    state = paddle.load(str(run_dir / f"checkpoint-{step}" / "optimizer.pdopt"), return_numpy=True)
    return [k for k, v in state.items() if k.endswith("_exp_avg_codes") and v.dtype == np.uint8], state


def _train_and_resume(model, photos, tmp_path, extra, load):
    """Four steps with checkpoints every 2; the run resumed from checkpoint-2 ends with the same weights."""
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(model, photos, full, steps=4, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    quantized, state = _quantized_keys(full, 4)
    assert quantized, sorted(state)[:5]
    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        model, photos, resumed, steps=4, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    saved, again = load(full), load(resumed)
    assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)
    return saved, state


def test_full_fine_tune_with_text_encoder_trains_and_resumes_exactly(tiny_model, photos, tmp_path):
    from helpers.models import load_unet_weights

    extra = ["--optim", "adamw_8bit", "--checkpointing_steps", "2", "--train_text_encoder",
             "--text_encoder_learning_rate", "5e-4"]
    saved, state = _train_and_resume(tiny_model, photos, tmp_path, extra, lambda d: load_unet_weights(str(d)))
    base = load_unet_weights(tiny_model)
    assert sum(not np.array_equal(saved[k], base[k]) for k in saved) > len(saved) // 2
    # Every trained weight, the text encoder's included, has state: 8-bit codes from 4096 values up, else float32
    # (the checkpoint's model state and the optimizer's keys list the weights in the same order).
    trained = paddle.load(str(tmp_path / "full" / "checkpoint-4" / "model_state.pdparams"), return_numpy=True)
    names = [k[: -len("_adamw8bit_step")] for k in state if k.endswith("_adamw8bit_step")]
    assert len(names) == len(trained) and any(k.startswith("text_encoder.") for k in trained)
    for key, name in zip(trained, names):
        quantized = f"{name}_adamw8bit_exp_avg_codes" in state
        assert quantized == (trained[key].size >= 4096), key
        if quantized:
            assert state[f"{name}_adamw8bit_exp_avg_codes"].shape == (trained[key].size,)
        else:
            assert state[f"{name}_adamw8bit_exp_avg"].shape == trained[key].shape


@pytest.mark.parametrize("family, rank", [("sd", 64), ("sdxl", 64), ("sd3", 128)])
def test_lora_trains_and_resumes_exactly(family, rank, photos, tmp_path, request):
    """A rank high enough for the tiny models' adapters (64 and 32 wide) to reach 4096 values and get 8-bit state."""
    from safetensors.numpy import load_file

    from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME

    model = request.getfixturevalue({"sd": "tiny_model", "sdxl": "tiny_sdxl_model", "sd3": "tiny_sd3_model"}[family])
    extra = ["--optim", "adamw_8bit", "--use_lora", "--lora_rank", str(rank), "--checkpointing_steps", "2"]
    saved, _ = _train_and_resume(model, photos, tmp_path, extra, lambda d: load_file(str(d / LORA_WEIGHTS_NAME)))
    assert any(k.endswith("up.weight") or "lora_B" in k for k in saved)
    ups = [v for k, v in saved.items() if "up" in k or "lora_B" in k]
    assert any(np.abs(v).max() > 0 for v in ups)  # the up-projections start at zero: they were trained
