"""Adafactor (ppdreambooth.modeling.optimizers): its formula against NumPy, factored state, checkpoints, rates, clipping."""
import math

import numpy as np
import paddle
import pytest

from helpers.optimizer_resume import resume_matches_uninterrupted
from ppdreambooth.modeling.optimizers import Adafactor


class NumpyAdafactor:
    """The update rule from the module docstring, in float64 NumPy, one parameter at a time."""

    def __init__(self, beta1=None, decay_rate=-0.8, eps=1e-30, clip_threshold=1.0):
        self.beta1, self.decay_rate, self.eps, self.clip_threshold = beta1, decay_rate, eps, clip_threshold
        self.state = {}
        self.clipped_updates = 0  # how often update clipping actually shrank an update

    def step(self, name, p, g, lr, weight_decay=0.0):
        p, g = p.astype(np.float64), g.astype(np.float64)
        st = self.state.setdefault(name, {"step": 0})
        st["step"] += 1
        beta2t = 1.0 - st["step"] ** self.decay_rate
        s = g * g + self.eps
        if p.ndim >= 2:
            st["row"] = beta2t * st.get("row", 0.0) + (1 - beta2t) * s.mean(axis=-1)
            st["col"] = beta2t * st.get("col", 0.0) + (1 - beta2t) * s.mean(axis=-2)
            v = (st["row"] / st["row"].mean(axis=-1, keepdims=True))[..., :, None] * st["col"][..., None, :]
        else:
            st["full"] = beta2t * st.get("full", 0.0) + (1 - beta2t) * s
            v = st["full"]
        u = g / np.sqrt(v)
        rms = np.sqrt(np.mean(u * u))
        if rms > self.clip_threshold:
            self.clipped_updates += 1
        u = lr * u / max(1.0, rms / self.clip_threshold)
        if self.beta1 is not None:
            st["m"] = self.beta1 * st.get("m", 0.0) + (1 - self.beta1) * u
            u = st["m"]
        return p - lr * weight_decay * p - u


class TinyNet(paddle.nn.Layer):
    """A 4-D conv weight, 2-D linear weight and 1-D biases."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(2, 3, 3)
        self.linear = paddle.nn.Linear(12, 4)

    def forward(self, x):
        return self.linear(paddle.tanh(self.conv(x)).flatten(1))


def make_net(seed=0):
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():  # the same parameter names (optimizer state keys) every time
        return TinyNet()


def batch(step):
    rng = np.random.RandomState(100 + step)
    x = paddle.to_tensor(rng.standard_normal((5, 2, 4, 4)).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal((5, 4)).astype("float32"))
    return x, y


def backward(net, step):
    x, y = batch(step)
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    return float(loss)


def assert_close(actual, expected, message=""):
    """float32 against float64 to 1e-6 relative, elementwise; entries near zero are judged against the
    tensor's largest entry (their float32 rounding error is that of the update, not of their own size)."""
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale, err_msg=message)


def run_against_reference(net, opt, ref, steps, lr_of, decay_of=lambda p: 0.0, clip_grads=None, scheduler=None):
    """Step the optimizer and the NumPy reference side by side (same gradients), comparing every step."""
    params = [p for p in net.parameters() if not p.stop_gradient]
    expected = {p.name: p.numpy().astype(np.float64) for p in params}
    for step in range(steps):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        if clip_grads is not None:
            grads = clip_grads(grads)
        lrs = {p.name: lr_of(step, p) for p in params}
        opt.step()
        opt.clear_grad()
        if scheduler is not None:
            scheduler.step()
        for p in params:
            expected[p.name] = ref.step(p.name, expected[p.name], grads[p.name], lrs[p.name], decay_of(p))
            assert_close(p.numpy(), expected[p.name], f"{p.name} after step {step + 1}")
    return expected


# (a) the formula -----------------------------------------------------------------------------------

@pytest.mark.parametrize("beta1", [None, 0.9])
def test_steps_equal_numpy_formula(beta1):
    net = make_net()
    shapes = sorted(len(p.shape) for p in net.parameters())
    assert shapes == [1, 1, 2, 4]
    decayed = {net.conv.weight.name, net.linear.weight.name}  # biases are exempt
    opt = Adafactor(learning_rate=0.05, parameters=net.parameters(), weight_decay=0.1,
                    apply_decay_param_fun=lambda name: name in decayed, beta1=beta1)
    ref = NumpyAdafactor(beta1=beta1)
    run_against_reference(net, opt, ref, steps=6, lr_of=lambda step, p: 0.05,
                          decay_of=lambda p: 0.1 if p.name in decayed else 0.0)
    assert ref.clipped_updates > 0  # the update-clipping branch was exercised, not only the identity
    # The moments themselves match too.
    state = opt.state_dict()
    w = net.linear.weight.name
    np.testing.assert_allclose(state[w + "_adafactor_exp_avg_sq_row"].numpy(), ref.state[w]["row"], rtol=1e-6)
    np.testing.assert_allclose(state[w + "_adafactor_exp_avg_sq_col"].numpy(), ref.state[w]["col"], rtol=1e-6)
    b = net.linear.bias.name
    np.testing.assert_allclose(state[b + "_adafactor_exp_avg_sq"].numpy(), ref.state[b]["full"], rtol=1e-6)
    if beta1 is not None:
        assert_close(state[w + "_adafactor_exp_avg"].numpy(), ref.state[w]["m"])
    assert int(state[w + "_adafactor_step"]) == 6


def test_weight_decay_without_decay_function_applies_to_all():
    net = make_net()
    opt = Adafactor(0.05, net.parameters(), weight_decay=0.2)
    run_against_reference(net, opt, NumpyAdafactor(), steps=3, lr_of=lambda s, p: 0.05, decay_of=lambda p: 0.2)


def test_frozen_and_gradientless_parameters_are_skipped():
    net = make_net()
    net.conv.bias.stop_gradient = True
    opt = Adafactor(0.05, net.parameters())
    frozen = net.conv.bias.numpy().copy()
    backward(net, 0)
    net.linear.bias.clear_gradient(False)  # no gradient at all for this one
    untouched = net.linear.bias.numpy().copy()
    opt.step()
    assert np.array_equal(net.conv.bias.numpy(), frozen)
    assert np.array_equal(net.linear.bias.numpy(), untouched)
    assert set(opt._state) == {net.conv.weight.name, net.linear.weight.name}


# (b) factored state ----------------------------------------------------------------------------------

def test_second_moment_of_a_matrix_is_factored():
    paddle.seed(0)
    layer = paddle.nn.Linear(256, 512)
    assert list(layer.weight.shape) == [256, 512]
    opt = Adafactor(1e-3, layer.parameters())
    layer(paddle.randn([3, 256])).mean().backward()
    opt.step()
    state = opt.state_dict()
    prefix = layer.weight.name + "_adafactor_"
    weight_state = {k: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("step")}
    assert sorted(weight_state) == [layer.weight.name + "_adafactor_exp_avg_sq_col",
                                    layer.weight.name + "_adafactor_exp_avg_sq_row"]
    assert sum(int(np.prod(v.shape)) for v in weight_state.values()) == 256 + 512  # not 131072
    assert all(v.dtype == paddle.float32 for v in weight_state.values())
    assert list(state[layer.bias.name + "_adafactor_exp_avg_sq"].shape) == [512]  # 1-D: a full second moment


# (c) checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("beta1", [None, 0.9])
def test_resume_from_saved_state_is_bit_identical(tmp_path, beta1):
    def new_optimizer(net):
        scheduler = paddle.optimizer.lr.StepDecay(0.05, step_size=2, gamma=0.5)
        opt = Adafactor(learning_rate=scheduler, parameters=net.parameters(), weight_decay=0.1,
                        apply_decay_param_fun=lambda name: name.endswith("w_0"), beta1=beta1,
                        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
        return opt, scheduler

    def train(net, opt, scheduler, steps):
        for step in steps:
            backward(net, step)
            opt.step()
            opt.clear_grad()
            scheduler.step()

    continued_state, (net, _), _ = resume_matches_uninterrupted(tmp_path, make_net, new_optimizer, train, 3, 7)
    assert int(continued_state[net.linear.weight.name + "_adafactor_step"]) == 7


def test_set_state_dict_copies_and_checks():
    net = make_net()
    opt = Adafactor(0.05, net.parameters())
    backward(net, 0)
    opt.step()
    saved = opt.state_dict()
    key = net.linear.weight.name + "_adafactor_exp_avg_sq_row"
    before = saved[key].numpy().copy()
    other = Adafactor(0.05, net.parameters())
    other.set_state_dict(saved)
    backward(net, 1)
    other.step()
    assert np.array_equal(saved[key].numpy(), before)  # the loaded optimizer does not write into the dict

    wrong = dict(saved)
    wrong[key] = paddle.zeros([5])
    with pytest.raises(ValueError, match="shape"):
        Adafactor(0.05, net.parameters()).set_state_dict(wrong)
    missing = dict(saved)
    del missing[key]
    with pytest.raises(ValueError, match="missing"):
        Adafactor(0.05, net.parameters()).set_state_dict(missing)
    adamw = paddle.optimizer.AdamW(0.05, parameters=net.parameters())
    backward(net, 2)
    adamw.step()
    with pytest.raises(ValueError, match="not an Adafactor state dict"):
        Adafactor(0.05, net.parameters()).set_state_dict(adamw.state_dict())


# (d) learning rates ----------------------------------------------------------------------------------

def test_scheduler_rate_and_per_parameter_multiplier_are_honoured():
    net = make_net()
    net.linear.weight.optimize_attr["learning_rate"] = 0.3
    net.conv.bias.optimize_attr["learning_rate"] = 0.0  # how ppdreambooth freezes the text encoder
    scheduler = paddle.optimizer.lr.LambdaDecay(0.08, lambda epoch: 1.0 / (1 + epoch))
    opt = Adafactor(learning_rate=scheduler, parameters=net.parameters(), weight_decay=0.1)
    frozen = net.conv.bias.numpy().copy()

    def lr_of(step, p):
        return 0.08 / (1 + step) * p.optimize_attr["learning_rate"]

    run_against_reference(net, opt, NumpyAdafactor(), steps=5, lr_of=lr_of, decay_of=lambda p: 0.1,
                          scheduler=scheduler)
    assert np.array_equal(net.conv.bias.numpy(), frozen)
    assert opt.get_lr() == pytest.approx(0.08 / 6)


# (e) gradient clipping -------------------------------------------------------------------------------

def test_global_norm_clipping_is_over_all_parameters():
    clip_norm = 0.05
    net = make_net()
    opt = Adafactor(0.05, net.parameters(), beta1=0.5, grad_clip=paddle.nn.ClipGradByGlobalNorm(clip_norm))
    factors = []

    def clip_globally(grads):
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        factors.append(clip_norm / max(norm, clip_norm))
        return {k: g * factors[-1] for k, g in grads.items()}

    # Adafactor's update barely depends on a gradient's scale, so compare the second moment of step one,
    # which is the clipped gradient squared: one factor for all parameters, not a factor per parameter.
    backward(net, 0)
    raw = {p.name: p.grad.numpy().astype(np.float64) for p in net.parameters()}
    opt.step()
    opt.clear_grad()
    factor = clip_norm / math.sqrt(sum(float((g * g).sum()) for g in raw.values()))
    assert factor < 0.5
    b = net.linear.bias.name
    stored = opt.state_dict()[b + "_adafactor_exp_avg_sq"].numpy()
    np.testing.assert_allclose(stored, (factor * raw[b]) ** 2, rtol=1e-5)
    per_parameter = clip_norm / np.linalg.norm(raw[b])
    assert not np.allclose(stored, (per_parameter * raw[b]) ** 2, rtol=1e-2)
    w = net.conv.weight.name
    np.testing.assert_allclose(opt.state_dict()[w + "_adafactor_exp_avg_sq_row"].numpy(),
                               ((factor * raw[w]) ** 2).mean(axis=-1), rtol=1e-5)

    # Later steps (second moments now mix differently scaled gradients) follow the reference too.
    net2 = make_net()
    opt2 = Adafactor(0.05, net2.parameters(), beta1=0.5, grad_clip=paddle.nn.ClipGradByGlobalNorm(clip_norm))
    run_against_reference(net2, opt2, NumpyAdafactor(beta1=0.5), steps=5, lr_of=lambda s, p: 0.05,
                          clip_grads=clip_globally)
    assert all(f < 1.0 for f in factors)


# (f) it trains -------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta1", [None, 0.9])
def test_loss_decreases_on_a_regression(beta1):
    paddle.seed(0)
    rng = np.random.RandomState(0)
    x = rng.standard_normal((64, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 2)) + 0.5).astype("float32")
    x, y = paddle.to_tensor(x), paddle.to_tensor(y)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 2))
    opt = Adafactor(0.01, model.parameters(), beta1=beta1)
    losses = []
    for _ in range(150):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# Low precision and AMP -------------------------------------------------------------------------------

def _bf16_param(values):
    layer = paddle.nn.Linear(*values.shape)
    layer.to(dtype="bfloat16")  # as AMP O2 or a bf16 model would
    layer.weight.set_value(paddle.to_tensor(values).astype("bfloat16"))
    return layer.weight


def test_bfloat16_parameters_get_float32_state_and_master_weights():
    rng = np.random.RandomState(0)
    values = rng.standard_normal((6, 5)).astype("float32")
    target = paddle.to_tensor(rng.standard_normal((6, 5)).astype("float32"))
    plain, master = _bf16_param(values), _bf16_param(values)
    opt_plain = Adafactor(0.05, [plain])
    opt_master = Adafactor(0.05, [master], multi_precision=True)  # what PaddleNLP passes under O2
    ref = NumpyAdafactor()
    expected = master.astype("float32").numpy().astype(np.float64)
    for step in range(3):
        for param in (plain, master):
            ((param.astype("float32") - target) ** 2).sum().backward()
        grad = master.grad.astype("float32").numpy()
        opt_plain.step()
        opt_master.step()
        opt_plain.clear_grad()
        opt_master.clear_grad()
        expected = ref.step("p", expected, grad, 0.05)
    assert plain.dtype == paddle.bfloat16 and master.dtype == paddle.bfloat16
    state = opt_master.state_dict()
    assert state[master.name + "_adafactor_exp_avg_sq_row"].dtype == paddle.float32
    fp32_master = state["master_weights"][master.name]
    assert fp32_master.dtype == paddle.float32
    np.testing.assert_allclose(fp32_master.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(master.astype("float32").numpy(), expected, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(plain.astype("float32").numpy(), expected, rtol=2e-2, atol=2e-2)
    assert "master_weights" not in opt_plain.state_dict()


def test_step_is_skipped_when_the_grad_scaler_found_inf():
    net = make_net()
    opt = Adafactor(0.05, net.parameters())
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    backward(net, 0)
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(True))  # as paddle.amp.GradScaler.step does
    opt.step()
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in net.state_dict().items())
    assert opt.state_dict() == {}
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(False))
    opt.step()
    assert not np.array_equal(net.linear.weight.numpy(), before["linear.weight"])


# PaddleNLP's Trainer -----------------------------------------------------------------------------

def test_constructor_takes_what_paddlenlp_trainer_passes():
    net = make_net()
    scheduler = paddle.optimizer.lr.LinearWarmup(0.01, warmup_steps=2, start_lr=0.0, end_lr=0.01)
    opt = Adafactor(learning_rate=scheduler, apply_decay_param_fun=lambda name: True, parameters=net.parameters(),
                    weight_decay=0.0, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0), multi_precision=True)
    assert hasattr(Adafactor, "_create_master_weight")  # so the Trainer adds multi_precision under O2
    backward(net, 0)
    opt.step()
    opt.clear_grad()
    assert all(p.grad is None or not p.grad.numpy().any() for p in net.parameters())
    assert "LR_Scheduler" in opt.state_dict()


def test_parameter_groups_take_their_own_rate_and_decay():
    net = make_net()
    groups = [{"params": net.conv.parameters(), "learning_rate": 0.5, "weight_decay": 0.0},
              {"params": net.linear.parameters()}]  # the optimizer's weight decay
    opt = Adafactor(0.05, groups, weight_decay=0.1)
    conv = {p.name for p in net.conv.parameters()}
    run_against_reference(net, opt, NumpyAdafactor(), steps=3,
                          lr_of=lambda s, p: 0.025 if p.name in conv else 0.05,
                          decay_of=lambda p: 0.0 if p.name in conv else 0.1)


def test_paddlenlp_trainer_builds_saves_and_resumes_it(tmp_path, monkeypatch):
    """The real Trainer: create_optimizer's keyword arguments, optimizer.pdopt at a checkpoint, resume."""
    from paddlenlp.trainer import Trainer, TrainingArguments

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda args: (Adafactor, {"beta1": 0.9})))

    class Regression(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = paddle.nn.Linear(4, 8), paddle.nn.LayerNorm(8), paddle.nn.Linear(8, 1)

        def forward(self, x, y):
            return (((self.b(self.norm(self.a(x))) - y) ** 2).mean(),)

    rng = np.random.RandomState(0)
    data = [{"x": rng.standard_normal(4).astype("float32"), "y": rng.standard_normal(1).astype("float32")}
            for _ in range(32)]

    def train(output_dir, resume=None):
        paddle.seed(0)
        with paddle.utils.unique_name.guard():
            model = Regression()
        args = TrainingArguments(output_dir=str(output_dir), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                                 learning_rate=0.01, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1,
                                 max_grad_norm=0.5, seed=0, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        assert isinstance(trainer.optimizer, Adafactor)
        assert trainer.optimizer._state[model.a.weight.name]["step"] == 6
        return {k: v.numpy() for k, v in model.state_dict().items()}

    straight = train(tmp_path / "straight")
    saved = paddle.load(str(tmp_path / "straight" / "checkpoint-3" / "optimizer.pdopt"))
    assert int(saved["linear_0.w_0_adafactor_step"]) == 3 and "LR_Scheduler" in saved
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for name, value in straight.items():
        assert np.array_equal(resumed[name], value), name
