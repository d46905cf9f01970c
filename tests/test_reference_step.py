"""ppdreambooth's training step equals the plain loop's (tests/helpers/reference_loop.py), weight for weight.

One square photo at the training size leaves the data no freedom, so with the same seed both draw the
same latent sample, noise and timestep at every step: any difference in what the optimizer receives or
does (clipping, weight decay, scaling, extra steps) shows up in the weights. Issue 15 was such a drift:
gradient clipping was off by default while the seed script clips at 1.0.
"""
import os

import numpy as np
import pytest
from PIL import Image

from helpers.reference_loop import train_plain

STEPS = 5


def one_square_photo(folder):
    os.makedirs(folder, exist_ok=True)
    pixels = np.random.RandomState(3).randint(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, "photo.png"))
    return str(folder), (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def train_ppdreambooth(model, photos, out, extra):
    from ppdreambooth.config.parsing import parse_args
    from ppdreambooth.train import run

    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", photos,
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_train_steps", str(STEPS), "--seed", "5", "--logging_steps", "1",
            "--save_steps", "1000", "--report_to", "none", "--disable_tqdm", "true", *extra]
    trainer = run(*parse_args(argv))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {k: v.numpy() for k, v in trainer.model.unet.state_dict().items()}, losses


def max_difference(a, b):
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("decay_bias_and_norm", [True, False], ids=["decay_all", "exempt_bias_norm"])
def test_step_equals_the_plain_loop(tiny_model, tmp_path, decay_bias_and_norm):
    photos, pixels = one_square_photo(tmp_path / "photo")
    ours, our_losses = train_ppdreambooth(tiny_model, photos, tmp_path / "out",
                                          ["--decay_bias_and_norm", str(decay_bias_and_norm).lower()])
    unet, plain_losses = train_plain(tiny_model, "a photo of sks dog", [pixels] * STEPS, 1e-3, seed=5,
                                     decay_all=decay_bias_and_norm)
    reference = {k: v.numpy() for k, v in unet.state_dict().items()}
    np.testing.assert_allclose(our_losses, plain_losses, rtol=1e-5)
    assert max_difference(ours, reference) < 1e-6
    # the two weight-decay choices are really different updates: the other choice drifts away
    unet_other, _ = train_plain(tiny_model, "a photo of sks dog", [pixels] * STEPS, 1e-3, seed=5,
                                decay_all=not decay_bias_and_norm)
    other = {k: v.numpy() for k, v in unet_other.state_dict().items()}
    assert max_difference(ours, other) > 1e-6


@pytest.mark.slow
def test_without_clipping_the_step_leaves_the_plain_loop(tiny_model, tmp_path):
    """The flag is honoured: --max_grad_norm 0 is the plain loop without clipping, and differs from clipping."""
    photos, pixels = one_square_photo(tmp_path / "photo")
    ours, _ = train_ppdreambooth(tiny_model, photos, tmp_path / "out", ["--max_grad_norm", "0"])
    unclipped, _ = train_plain(tiny_model, "a photo of sks dog", [pixels] * STEPS, 1e-3, seed=5, max_grad_norm=0)
    clipped, _ = train_plain(tiny_model, "a photo of sks dog", [pixels] * STEPS, 1e-3, seed=5)
    assert max_difference(ours, {k: v.numpy() for k, v in unclipped.state_dict().items()}) < 1e-6
    assert max_difference(ours, {k: v.numpy() for k, v in clipped.state_dict().items()}) > 1e-5
