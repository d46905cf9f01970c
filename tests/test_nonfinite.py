"""A non-finite loss is skipped by the optimizer on the device and stops the run before anything is saved;
the host reads the record only at logging/saving steps and at the end."""
import os

import numpy as np
import paddle
import pytest

from helpers.runs import train_argv
from ppdreambooth.config.parsing import parse_args
from ppdreambooth.modeling.model import DreamBoothModel
from ppdreambooth.runtime.nonfinite import NonFiniteGuard, NonFiniteLossError
from ppdreambooth.runtime.checkpoints import complete_checkpoints
from ppdreambooth.train import run

NAN = float("nan")


def test_guard_flags_the_bad_step_and_names_the_first():
    guard = NonFiniteGuard()
    flags = [bool(guard.observe(paddle.to_tensor(value), step)) for step, value in
             enumerate([0.5, 0.4, NAN, 0.3, float("inf")], start=1)]
    assert flags == [False, False, True, False, True]
    with pytest.raises(NonFiniteLossError) as caught:
        guard.check(current_step=5)
    assert caught.value.step == 3 and np.isnan(caught.value.value)
    assert "at step 3; the optimizer skipped that step" in str(caught.value) and "stopped at step 5" in str(caught.value)


def test_guard_is_silent_while_losses_are_finite_and_spoils_an_accumulated_step():
    guard = NonFiniteGuard()
    guard.check()  # nothing observed yet
    assert not bool(guard.observe(paddle.to_tensor(0.5), 1))
    guard.check(current_step=1)
    # gradient accumulation: micro-steps of optimizer step 2 share one flag
    assert bool(guard.observe(paddle.to_tensor(NAN), 2))
    assert bool(guard.observe(paddle.to_tensor(0.2), 2))  # the finite micro-step after it keeps the skip
    assert not bool(guard.observe(paddle.to_tensor(0.2), 3))


def test_without_logging_or_saving_the_record_is_still_read_every_256_steps():
    guard = NonFiniteGuard()
    for step in range(1, 301):  # finite losses: the record stays bounded and nothing is raised
        guard.observe(paddle.to_tensor(0.5), step)
    assert len(guard._pending) <= NonFiniteGuard.MAX_PENDING
    guard.check()
    guard.observe(paddle.to_tensor(NAN), 301)
    with pytest.raises(NonFiniteLossError) as caught:
        for step in range(302, 302 + NonFiniteGuard.MAX_PENDING):
            guard.observe(paddle.to_tensor(0.5), step)
    assert caught.value.step == 301


def test_found_inf_makes_adamw_skip_the_whole_update():
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.AdamW(0.1, parameters=layer.parameters(), weight_decay=0.01)
    guard = NonFiniteGuard()

    def step(number, scale):
        loss = layer(paddle.ones([4, 3])).mean() * scale
        loss.backward()
        optimizer._set_auxiliary_var("found_inf", guard.observe(loss, number))
        optimizer.step()
        optimizer.clear_grad()

    step(1, 1.0)
    before = [p.numpy().copy() for p in layer.parameters()]
    moments = {k: v.numpy().copy() for k, v in optimizer.state_dict().items() if isinstance(v, paddle.Tensor)}
    step(2, NAN)
    for p, old in zip(layer.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), old)
    for k, v in optimizer.state_dict().items():
        if isinstance(v, paddle.Tensor):
            np.testing.assert_array_equal(v.numpy(), moments[k])
    step(3, 1.0)  # a finite step afterwards is applied
    assert any(not np.array_equal(p.numpy(), old) for p, old in zip(layer.parameters(), before))


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the loss NaN at the given training step (counting forward calls)."""
    def install(bad_step):
        original, calls = DreamBoothModel.forward, {"n": 0}

        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == bad_step:
                out["loss"] = out["loss"] * NAN
            return out
        monkeypatch.setattr(DreamBoothModel, "forward", forward)
    return install


def test_a_nan_between_logging_steps_is_skipped_and_stops_before_the_next_save(
        tiny_model, photos, tmp_path, nan_at_step, monkeypatch):
    reads = []
    original_check = NonFiniteGuard.check
    monkeypatch.setattr(NonFiniteGuard, "check", lambda self, current_step=None: (
        reads.append(current_step), original_check(self, current_step))[1])
    nan_at_step(3)
    out = tmp_path / "out"
    argv = train_argv(tiny_model, photos, out, steps=8, extra=["--logging_steps", "4", "--checkpointing_steps", "2"])
    trained, model_init = {}, DreamBoothModel.__init__

    def init(self, *args, **kwargs):  # keep a handle on the model being trained
        model_init(self, *args, **kwargs)
        trained["model"] = self
    monkeypatch.setattr(DreamBoothModel, "__init__", init)
    with pytest.raises(NonFiniteLossError) as caught:
        run(*parse_args(argv))
    assert caught.value.step == 3 and "stopped at step 4" in str(caught.value)
    assert reads == [2, 4]  # the host read the record at the saving steps only, not at every step
    assert [os.path.basename(c) for c in complete_checkpoints(str(out))] == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    # steps 1, 2 and 4 were applied, step 3 was not: a NaN step would have made every weight NaN
    weights = [p.numpy() for p in trained["model"].unet.parameters()]
    assert all(np.isfinite(w).all() for w in weights)
