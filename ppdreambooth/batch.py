"""The training batch: the one definition of its keys, shared by the dataset that fills it, the caching that
replaces some of its entries, the families that add conditioning, and `DreamBoothModel.forward` that reads it.

A batch holds one row per example, the instance examples first and then (with prior preservation) the class
examples. Each row carries the image either as pixels or as its cached latent distribution, and the prompt either
as token ids or as cached embeddings:

- `pixel_values`: [n, 3, h, w] float32 in [-1, 1], images still to encode;
- `latent_mean`, `latent_std`: [n, c, h/8, w/8] float32, the VAE's cached latent distribution;
- `latent_cached`: [n] bool, in a batch that mixes both: which rows hold cached moments (the others hold pixels;
  the unused entry of a row is zeros);
- `input_ids`, `input_ids_2`, `input_ids_3`: [n, length] int64, the ids of each tokenizer (`token_key(i)`);
- `prompt_embeds` (and `pooled_prompt_embeds` for SDXL and SD3): the cached text-encoder outputs;
- per-family conditioning on the image geometry: SDXL's `time_ids` [n, 6];
- `loss_mask`: [n, 1, h/8, w/8] float32 in [0, 1] with `--masked_loss`: each latent cell's weight in the loss
  (the instance photo's mask, area-averaged; all ones for class rows);
- `noise`, `timesteps`: optional, given by tests to fix the draw.
"""
from typing import Tuple

Size = Tuple[int, int]  # (height, width) in pixels

PIXEL_VALUES = "pixel_values"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
LATENT_CACHED = "latent_cached"
PROMPT_EMBEDS = "prompt_embeds"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"
TIME_IDS = "time_ids"
NOISE = "noise"
TIMESTEPS = "timesteps"
LOSS_MASK = "loss_mask"
# the rows of an item of `DreamBoothDataset`: an instance example and, with prior preservation, a class example
INSTANCE, CLASS = "instance", "class"


def token_key(n: int) -> str:
    """Key of the n-th tokenizer's ids: input_ids, input_ids_2, input_ids_3."""
    return "input_ids" if n == 0 else f"input_ids_{n + 1}"


def is_token_key(key: str) -> bool:
    return key.startswith("input_ids")
