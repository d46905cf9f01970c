"""Block-wise 8-bit quantization with a dynamic map, for the optimizer state of `--optim adamw_8bit`.

Written here because neither Paddle 3.3.1, PaddleNLP 2.8.1 nor ppdiffusers has it (bitsandbytes, which
does, is CUDA and PyTorch only). The scheme is the one of Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", as bitsandbytes' `create_dynamic_map` defines the map:

The dynamic map. 256 values in [-1, 1], dense near 0 and coarse near 1 like a float's exponent: seven
decades, the k-th (k = 0..6) covering magnitudes 10 ** (k - 6) * [0.1, 1]; [0.1, 1] is cut into n_k equal
parts and the decade's values are 10 ** (k - 6) times the parts' midpoints. Unsigned map (for Adam's second
moment, never negative): n_k = 2 ** (k + 1), i.e. 254 values, plus 0 and 1. Signed map (first moment): n_k =
2 ** k, i.e. 127 magnitudes, each with both signs, plus 0 and 1; bitsandbytes' signed map stops there (its most
negative value is -0.99297), here -1 is added instead of its smallest negative value (-5.5e-7), so that a
block's largest entry is stored exactly whichever its sign (values below 1e-6 of the block's largest
are not distinguished from 0 on the negative side, which Adam's step cannot tell apart anyway).

Block-wise quantization. A tensor is flattened and cut into blocks of `BLOCK_SIZE` = 256 values (the last one
may be shorter); each block keeps its absolute maximum (float32) and each value the uint8 index of the map
value nearest to value / absmax (a block of zeros has absmax 0 and codes of 0.0). "Nearest" is decided
against the float32 midpoints between consecutive map values: the code is the number of midpoints strictly
below the normalised value, so a value exactly on a midpoint takes the lower code. Dequantizing is
map[code] * absmax in float32.

Block size. 256, as bitsandbytes' 8-bit optimizers use today (the paper's were 2048): the paper's point is
that an outlier only coarsens its own block, and smaller blocks confine it more; the cost is one float32
absmax per 256 values, 4/256 = 0.016 bytes per value.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import paddle

BLOCK_SIZE = 256
_DECADES = 7


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of the dynamic map (see the module docstring)."""
    magnitudes = []
    for k in range(_DECADES):
        parts = 2 ** k if signed else 2 ** (k + 1)
        edges = np.linspace(0.1, 1.0, parts + 1)
        magnitudes.extend(10.0 ** (k - _DECADES + 1) * (edges[:-1] + edges[1:]) / 2.0)
    values = [0.0, 1.0] + magnitudes
    if signed:
        negatives = sorted(-m for m in magnitudes)[:-1]  # the smallest magnitude gives its code to -1
        values += negatives + [-1.0]
    result = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
    assert result.shape == (256,) and np.all(np.diff(result) > 0)
    return result


def decision_midpoints(qmap: np.ndarray) -> np.ndarray:
    """The 255 float32 midpoints between consecutive map values, against which the nearest value is chosen."""
    qmap = qmap.astype(np.float64)
    return ((qmap[:-1] + qmap[1:]) / 2.0).astype(np.float32)


class BlockQuantizer:
    """Quantize and dequantize float32 tensors block-wise against one dynamic map (signed or unsigned)."""

    def __init__(self, signed: bool, block_size: int = BLOCK_SIZE):
        self.signed, self.block_size = signed, int(block_size)
        self.qmap_numpy = dynamic_map(signed)
        self._qmap = paddle.to_tensor(self.qmap_numpy)
        self._midpoints = paddle.to_tensor(decision_midpoints(self.qmap_numpy))

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _blocks(self, flat):
        """`flat` zero-padded to whole blocks, shape [blocks, block_size]."""
        pad = (-flat.shape[0]) % self.block_size
        if pad:
            flat = paddle.concat([flat, paddle.zeros([pad], dtype=flat.dtype)])
        return flat.reshape([-1, self.block_size])

    def quantize(self, values) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """(uint8 codes of shape [numel], float32 absmax of shape [blocks]) of a float32 tensor of any shape."""
        flat = values.reshape([-1])
        numel = flat.shape[0]
        blocks = self._blocks(flat)
        absmax = blocks.abs().max(axis=1)
        scale = paddle.where(absmax > 0, absmax, paddle.ones_like(absmax))
        normalised = blocks / scale.unsqueeze(1)
        codes = paddle.searchsorted(self._midpoints, normalised).reshape([-1])[:numel]
        return codes.astype("uint8"), absmax

    def dequantize(self, codes, absmax, shape) -> paddle.Tensor:
        """The float32 tensor of `shape` that (codes, absmax) stand for."""
        numel = codes.shape[0]
        values = paddle.gather(self._qmap, codes.astype("int64"))
        values = (self._blocks(values) * absmax.unsqueeze(1)).reshape([-1])[:numel]
        return values.reshape(shape)
