"""Block-wise 8-bit quantization (ppdreambooth.modeling.quantization, the state of `--optim adamw_8bit`): the dynamic
maps and their rounding error, and quantize/dequantize against a NumPy transcription, bit for bit."""
import numpy as np
import paddle
import pytest

from ppdreambooth.modeling.quantization import BLOCK_SIZE, BlockQuantizer, decision_midpoints, dynamic_map


def numpy_map(signed):
    """The map from its definition, decade by decade: 10 ** (k - 6) times the midpoints of [0.1, 1] cut into
    2 ** k (signed) or 2 ** (k + 1) (unsigned) equal parts; 0 and 1; signed: the negatives, -1 replacing the
    smallest one."""
    values = {0.0, 1.0}
    for k in range(7):
        parts = 2 ** k if signed else 2 ** (k + 1)
        width = 0.9 / parts
        for j in range(parts):
            magnitude = 10.0 ** (k - 6) * (0.1 + (j + 0.5) * width)
            values.add(magnitude)
            if signed and not (k == 0 and j == 0):
                values.add(-magnitude)
    if signed:
        values.add(-1.0)
    return np.array(sorted(values), dtype=np.float32)


def numpy_quantize(x, qmap, block=BLOCK_SIZE):
    """float32 codes and absmax: per block of `block` values, the number of float32 midpoints below x / absmax."""
    flat = x.astype(np.float32).reshape(-1)
    n = flat.size
    blocks = np.concatenate([flat, np.zeros((-n) % block, np.float32)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    normalised = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
    midpoints = decision_midpoints(qmap)
    codes = (normalised[..., None] > midpoints).sum(axis=-1).reshape(-1)[:n]
    return codes.astype(np.uint8), absmax


def numpy_dequantize(codes, absmax, qmap, block=BLOCK_SIZE):
    n = codes.size
    values = qmap[codes.astype(np.int64)]
    values = np.concatenate([values, np.zeros((-n) % block, np.float32)]).reshape(-1, block)
    return (values * absmax[:, None]).reshape(-1)[:n]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_values_and_round_trip_error(signed):
    qmap = dynamic_map(signed)
    assert qmap.dtype == np.float32 and qmap.shape == (256,)
    assert np.all(np.diff(qmap) > 0)  # sorted, no duplicates
    assert np.array_equal(qmap, numpy_map(signed))  # the definition, written out another way
    assert 0.0 in qmap and 1.0 in qmap
    if signed:
        assert qmap[0] == -1.0 and (qmap < 0).sum() == 127 and (qmap > 0).sum() == 128
        assert np.array_equal(np.sort(-qmap[qmap < 0])[:-1], qmap[qmap > 0][1:-1])  # mirrored but for +-1, 5.5e-7
    else:
        assert qmap[0] == 0.0 and (qmap > 0).sum() == 255
    # Every value of [-1, 1] ([0, 1]) goes to its nearest map value; the error is at most half the widest gap,
    # 0.9 / 64 (signed) or 0.9 / 128 (unsigned), and within decade k at most half that decade's spacing.
    rng = np.random.RandomState(0)
    magnitudes = np.concatenate([np.linspace(0.0, 1.0, 100001), 10.0 ** rng.uniform(-7.5, 0.0, 100000)])
    x = (magnitudes * (rng.choice([-1.0, 1.0], magnitudes.size) if signed else 1.0)).astype(np.float32)
    x = x[: (x.size // 255) * 255].reshape(-1, 255)  # and 1.0 in each block: absmax = 1 everywhere
    x = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1).reshape(-1)
    quantizer = BlockQuantizer(signed)
    codes, absmax = quantizer.quantize(paddle.to_tensor(x))
    assert np.all(absmax.numpy() == 1.0)
    back = quantizer.dequantize(codes, absmax, [x.size]).numpy()
    error = np.abs(back.astype(np.float64) - x)
    assert error.max() <= (0.9 / 64 if signed else 0.9 / 128) / 2 + 1e-7
    for k in range(7):
        in_decade = (np.abs(x) >= 10.0 ** (k - 6) * 0.1) & (np.abs(x) <= 10.0 ** (k - 6))
        spacing = 10.0 ** (k - 6) * 0.9 / (2 ** k if signed else 2 ** (k + 1))
        if signed and k == 0:  # no -5.5e-7 (its code went to -1): there, at most the decade's top, 1e-6
            assert error[in_decade & (x < 0)].max() <= 1e-6 * 1.001
            in_decade &= x > 0
        assert in_decade.sum() > 1000 and error[in_decade].max() <= spacing / 2 * 1.001, k
    # nearest: no map value is closer than the chosen one (checked on a subsample)
    sample = slice(None, None, 97)
    distances = np.abs(qmap[None, :].astype(np.float64) - x[sample, None])
    assert np.all(error[sample] <= distances.min(axis=1) + 1e-7)


def test_quantize_matches_numpy_transcription_bit_for_bit():
    rng = np.random.RandomState(0)
    cases = {
        "normal, partial last block": rng.standard_normal(1000).astype(np.float32),
        "heavy tails": (rng.standard_cauchy(3 * BLOCK_SIZE) * 1e-3).astype(np.float32),
        "a negative outlier, a zero block": np.concatenate(
            [rng.standard_normal(BLOCK_SIZE) * 1e-4, np.zeros(BLOCK_SIZE), [-5.0], rng.standard_normal(300)]
        ).astype(np.float32),
        "second moments": (rng.standard_normal((37, 50)) ** 2 * 1e-6).astype(np.float32),
    }
    for name, x in cases.items():
        for signed in (True, False):
            if not signed and (x < 0).any():
                continue
            quantizer = BlockQuantizer(signed)
            codes, absmax = quantizer.quantize(paddle.to_tensor(x))
            ref_codes, ref_absmax = numpy_quantize(x, dynamic_map(signed))
            assert codes.dtype == paddle.uint8 and codes.shape == [x.size], name
            assert absmax.shape == [-(-x.size // BLOCK_SIZE)], name
            assert np.array_equal(codes.numpy(), ref_codes), name
            assert np.array_equal(absmax.numpy(), ref_absmax), name
            back = quantizer.dequantize(codes, absmax, list(x.shape)).numpy()
            assert back.shape == x.shape and np.array_equal(back.reshape(-1), numpy_dequantize(ref_codes, ref_absmax,
                                                                                               dynamic_map(signed)))
            if signed:  # each block's largest magnitude comes back exactly, whatever its sign
                blocks = np.concatenate([x.reshape(-1), np.zeros((-x.size) % BLOCK_SIZE, np.float32)])
                flat = back.reshape(-1)
                for b, block in enumerate(blocks.reshape(-1, BLOCK_SIZE)):
                    i = np.abs(block).argmax() + b * BLOCK_SIZE
                    if i < x.size:
                        assert flat[i] == x.reshape(-1)[i], (name, b)
    assert np.all(BlockQuantizer(True).dequantize(*BlockQuantizer(True).quantize(paddle.zeros([300])), [300]).numpy()
                  == 0)
