"""The faster global-norm clip gives exactly the gradients of Paddle's `ClipGradByGlobalNorm`."""
import numpy as np
import paddle
import pytest

from ppdreambooth.modeling.clipping import GlobalNormClip, faster_clip


def gradients(seed, scale, dtypes=("float32",) * 6):
    """(parameter, gradient) pairs with random gradients of mixed shapes (one 0-d) and the given dtypes."""
    rng = np.random.RandomState(seed)
    shapes = [(7, 5), (5,), (3, 3, 2, 2), (), (11,), (4, 4)]
    pairs = []
    for shape, dtype in zip(shapes, dtypes):
        param = paddle.create_parameter(list(shape), dtype)
        pairs.append((param, paddle.to_tensor(rng.randn(*shape) * scale).astype(dtype)))
    return pairs


def copy(pairs):
    return [(p, None if g is None else g.clone()) for p, g in pairs]


@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["clipping", "under-the-norm"])
@pytest.mark.parametrize("dtypes", [("float32",) * 6, ("float32", "float64", "float32", "float64", "float64",
                                                        "float32")], ids=["fp32", "mixed-dtypes"])
def test_same_gradients_as_paddle(scale, dtypes):
    pairs = gradients(0, scale, dtypes)
    pairs[1][0].need_clip = False  # a parameter exempt from clipping keeps its gradient
    pairs.append((paddle.create_parameter([2], "float32"), None))  # a frozen parameter: no gradient
    expected = paddle.nn.ClipGradByGlobalNorm(1.0)(copy(pairs))
    ours = GlobalNormClip(1.0)(copy(pairs))
    assert [p.name for p, _ in ours] == [p.name for p, _ in expected]
    for (_, got), (_, want) in zip(ours, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.astype("float64").numpy(), want.astype("float64").numpy())
    if scale > 1:  # the clip really scaled: the clipped gradients' global norm is the limit
        norm = np.sqrt(sum(float((g.astype("float64") ** 2).sum()) for p, g in ours if p.need_clip is not False))
        assert norm == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_array_equal(ours[1][1].numpy(), pairs[1][1].numpy())


def test_optimizer_steps_identical_with_either_clip():
    """Five AdamW steps on a small network: the weights agree bit for bit."""
    def train(clip):
        paddle.seed(0)
        net = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.GELU(), paddle.nn.Linear(16, 4))
        opt = paddle.optimizer.AdamW(1e-2, parameters=net.parameters(), grad_clip=clip)
        data = paddle.to_tensor(np.random.RandomState(1).randn(32, 8).astype("float32"))
        for _ in range(5):
            (net(data) ** 2).mean().multiply(paddle.to_tensor(100.0)).backward()
            opt.step()
            opt.clear_grad()
        return [p.numpy() for p in net.parameters()]

    for a, b in zip(train(paddle.nn.ClipGradByGlobalNorm(0.5)), train(faster_clip(paddle.nn.ClipGradByGlobalNorm(0.5)))):
        np.testing.assert_array_equal(a, b)


def test_only_a_plain_global_norm_clip_is_replaced():
    assert isinstance(faster_clip(paddle.nn.ClipGradByGlobalNorm(2.0)), GlobalNormClip)
    assert faster_clip(paddle.nn.ClipGradByGlobalNorm(2.0)).clip_norm == 2.0
    by_value = paddle.nn.ClipGradByValue(1.0)
    assert faster_clip(by_value) is by_value
    assert faster_clip(None) is None
