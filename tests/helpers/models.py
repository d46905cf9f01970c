"""Building models and comparing weights in tests."""
import os

import numpy as np
import paddle

from ppdreambooth.config.arguments import ModelArguments
from ppdreambooth.modeling.build import build_model


def make_model(path, prior=False, **kw):
    """A DreamBoothModel of the model folder `path` (ModelArguments from `kw`), parameter names from zero: two
    models built in one test get the same names."""
    with paddle.utils.unique_name.guard():
        return build_model(ModelArguments(pretrained_model_name_or_path=path, **kw), with_prior_preservation=prior)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def load_unet_weights(folder):
    """UNet weights of a saved pipeline folder, as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_paddle_model.safetensors"))


def collate(examples):
    """A batch of dataset items as tensors, ready for `model(**batch)` (the trainer's collate gives NumPy arrays)."""
    from ppdreambooth.data.dataset import collate_arrays

    return {key: paddle.to_tensor(value) for key, value in collate_arrays(examples).items()}


def probe(unet, text_encoder):
    """(text-encoder hidden states, UNet output) of a tiny SD pipeline's networks for fixed random inputs: two
    pipelines give equal probes when their networks compute the same."""
    paddle.seed(42)
    latents, ids, t = paddle.randn([2, 4, 8, 8]), paddle.randint(0, 500, [2, 77]), paddle.to_tensor([3, 700])
    with paddle.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden.numpy(), unet(latents, t, hidden).sample.numpy()
