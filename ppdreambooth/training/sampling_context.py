"""Sampling from the weights being trained, for validation images and fidelity scoring, without disturbing training:
the EMA average swapped in with --use_ema (schedule-free AdamW's average x with --optim adamw_schedulefree), parked
encoders brought back to the device, eval mode, and every RNG
state restored afterwards."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import paddle

from ppdreambooth.inference.sampling import prepare_for_sampling


@contextlib.contextmanager
def preserved_rng_state():
    states = (paddle.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        paddle.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


@contextlib.contextmanager
def sampling_from(model, ema=None):
    """The pipeline over the weights being trained (the EMA average with --use_ema; with --optim
    adamw_schedulefree `ema` is a `schedulefree.ScheduleFreeWeights`: the optimizer's eval()/train() swap x in
    and y back), in eval mode; afterwards training is as it was: train/eval mode, parked encoders, weights and
    every RNG state restored."""
    was_training = model.denoiser.training
    averaged = ema.swapped_in() if ema is not None else contextlib.nullcontext()
    with preserved_rng_state(), model.parked_on_device(), averaged:
        model.eval()
        try:
            yield validation_pipeline(model)
        finally:
            if was_training:
                model.train()


def validation_pipeline(model):
    """The family's pipeline over the model's current denoiser, text encoders and VAE, with the family's
    deterministic sampler (DPM-Solver; SD3: flow-matching Euler) built from the model's own scheduler config."""
    family = model.family
    names = (family.denoiser, "vae", *family.text_encoders, *family.tokenizers)
    components = {name: getattr(model, name) if model.has_component(name) else None for name in names}
    return prepare_for_sampling(family.build_pipeline(components, model.noise_scheduler), family)
