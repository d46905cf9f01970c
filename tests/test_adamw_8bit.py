"""AdamW with 8-bit state (ppdreambooth.modeling.adamw8bit; its quantization: test_quantization.py): the step against
a float64 transcription, closeness to float32 AdamW, the state's size, exact resume, `--optim adamw_8bit` through the
arguments and the Trainer (training runs: test_adamw_8bit_training.py)."""
import os

import numpy as np
import paddle
import pytest

from helpers.optimizer_resume import resume_matches_uninterrupted
from ppdreambooth.modeling.adamw8bit import AdamW8bit
from ppdreambooth.modeling.quantization import BLOCK_SIZE, decision_midpoints, dynamic_map


# The NumPy transcription -------------------------------------------------------------------------------------

class NumpyAdamW8bit:
    """The module docstring's step in float64, quantizing m and v after each step. Where float32 and float64 may
    decide a code differently (the normalised value within 1e-5 of a midpoint), the optimizer's code is adopted
    and counted in `ambiguous`; every other code must agree."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, min_size=4096):
        self.lr, self.b1, self.b2, self.eps, self.min_size = lr, betas[0], betas[1], eps, min_size
        self.maps = {"exp_avg": dynamic_map(True).astype(np.float64), "exp_avg_sq": dynamic_map(False).astype(np.float64)}
        self.mids = {kind: decision_midpoints(m.astype(np.float32)).astype(np.float64) for kind, m in self.maps.items()}
        self.state, self.ambiguous, self.codes_checked = {}, 0, 0

    def _requantize(self, kind, value, theirs):
        flat = value.reshape(-1)
        n = flat.size
        blocks = np.concatenate([flat, np.zeros((-n) % BLOCK_SIZE)]).reshape(-1, BLOCK_SIZE)
        absmax = np.abs(blocks).max(axis=1)
        normalised = (blocks / np.where(absmax > 0, absmax, 1.0)[:, None]).reshape(-1)[:n]
        codes = np.searchsorted(self.mids[kind], normalised, side="left")
        near = np.abs(normalised[:, None] - self.mids[kind][None, :]).min(axis=1) < 1e-5
        assert np.array_equal(codes[~near], theirs[~near].astype(np.int64)), f"{kind}: codes differ"
        self.ambiguous += int((near & (codes != theirs)).sum())
        self.codes_checked += n
        codes = np.where(near, theirs.astype(np.int64), codes)
        decoded = self.maps[kind][codes].reshape(-1)
        padded = np.concatenate([decoded, np.zeros((-n) % BLOCK_SIZE)]).reshape(-1, BLOCK_SIZE)
        return (padded * absmax[:, None]).reshape(-1)[:n].reshape(value.shape)

    def step(self, name, p, g, rate_multiplier=1.0, decay=0.0, their_codes=None):
        st = self.state.setdefault(name, {"t": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)})
        st["t"] += 1
        t = st["t"]
        m = self.b1 * st["exp_avg"] + (1 - self.b1) * g
        v = self.b2 * st["exp_avg_sq"] + (1 - self.b2) * g * g
        u = (m / (1 - self.b1 ** t)) / (np.sqrt(v / (1 - self.b2 ** t)) + self.eps)
        rate = self.lr * rate_multiplier
        p = p - rate * (u + decay * p)
        if p.size >= self.min_size:
            m = self._requantize("exp_avg", m, their_codes["exp_avg"])
            v = self._requantize("exp_avg_sq", v, their_codes["exp_avg_sq"])
        st["exp_avg"], st["exp_avg_sq"] = m, v
        return p


class Net(paddle.nn.Layer):
    """A 20x230 weight (4600 values: 8-bit state, 18 blocks, the last one partial) and small ones (float32 state)."""

    def __init__(self):
        super().__init__()
        self.hidden = paddle.nn.Linear(20, 230)
        self.out = paddle.nn.Linear(230, 3)

    def forward(self, x):
        return self.out(paddle.tanh(self.hidden(x)))


def make_net(seed=0):
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        return Net()


def backward(net, step):
    rng = np.random.RandomState(200 + step)
    x = paddle.to_tensor(rng.standard_normal((16, 20)).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal((16, 3)).astype("float32"))
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    return float(loss)


def assert_close(actual, expected, message=""):
    """1e-6 relative, elementwise; entries near zero judged against the tensor's largest entry."""
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale, err_msg=message)


# (1) the step -------------------------------------------------------------------------------------------------

def run_side_by_side(opt, ref, net, steps, rates=None, decays=None):
    rates, decays = rates or {}, decays or {}
    params = list(net.parameters())
    weights = {p.name: p.numpy().astype(np.float64) for p in params}
    for step in range(steps):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        opt.step()
        opt.clear_grad()
        state = opt.state_dict()
        for p in params:
            codes = None
            if opt.is_quantized(p):
                codes = {kind: state[f"{p.name}_adamw8bit_{kind}_codes"].numpy() for kind in ("exp_avg", "exp_avg_sq")}
            weights[p.name] = ref.step(p.name, weights[p.name], grads[p.name], rates.get(p.name, 1.0),
                                       decays.get(p.name, 0.0), codes)
            assert_close(p.numpy(), weights[p.name], f"{p.name} after step {step + 1}")
    return weights


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_match_float64_transcription(weight_decay):
    net = make_net()
    decayed = {net.hidden.weight.name, net.out.weight.name}
    net.out.weight.optimize_attr["learning_rate"] = 0.5  # a --text_encoder_learning_rate-style multiplier
    opt = AdamW8bit(0.01, net.parameters(), weight_decay=weight_decay, apply_decay_param_fun=lambda n: n in decayed)
    assert opt.is_quantized(net.hidden.weight) and not opt.is_quantized(net.hidden.bias)
    ref = NumpyAdamW8bit(0.01)
    run_side_by_side(opt, ref, net, 15, rates={net.out.weight.name: 0.5},
                     decays={name: weight_decay for name in decayed})
    assert ref.codes_checked == 15 * 2 * 4600
    assert ref.ambiguous <= ref.codes_checked * 1e-3, ref.ambiguous
    state = opt.state_dict()
    assert state[f"{net.hidden.weight.name}_adamw8bit_exp_avg_codes"].dtype == paddle.uint8
    assert int(state[f"{net.hidden.weight.name}_adamw8bit_step"]) == 15


def test_quantization_is_real_the_float64_adamw_without_it_differs():
    """The transcription above could not pass with float32 moments: plain AdamW drifts away by far more."""
    net, twin = make_net(), make_net()
    opt = AdamW8bit(0.01, net.parameters(), weight_decay=0.0)
    plain = AdamW8bit(0.01, twin.parameters(), weight_decay=0.0, min_8bit_size=10 ** 9)  # float32 state everywhere
    for step in range(15):
        for n, o in ((net, opt), (twin, plain)):
            backward(n, step)
            o.step()
            o.clear_grad()
    gap = np.abs(net.hidden.weight.numpy() - twin.hidden.weight.numpy()).max()
    assert gap > 1e-4 * np.abs(twin.hidden.weight.numpy()).max(), gap


def test_small_parameters_take_paddles_adamw_step():
    """Below min_8bit_size the state is float32 and the step is AdamW's: against paddle.optimizer.AdamW."""
    net, twin = make_net(), make_net()
    for n in (net, twin):
        n.out.weight.optimize_attr["learning_rate"] = 0.5
    decay_fun = lambda name: name.endswith("w_0")  # noqa: E731
    opt = AdamW8bit(0.01, net.parameters(), weight_decay=0.1, apply_decay_param_fun=decay_fun, min_8bit_size=10 ** 6,
                    grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5))
    reference = paddle.optimizer.AdamW(0.01, parameters=twin.parameters(), weight_decay=0.1,
                                       apply_decay_param_fun=decay_fun, grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5))
    for step in range(12):
        for n, o in ((net, opt), (twin, reference)):
            backward(n, step)
            o.step()
            o.clear_grad()
    assert not any(opt.is_quantized(p) for p in net.parameters())
    for a, b in zip(net.parameters(), twin.parameters()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)


def test_trajectory_stays_close_to_float32_adamw():
    """A regression problem (an MLP with two 8-bit weights, 8192 and 16384 values), 300 steps at 3e-3 from the
    same start on the same batches. Measured here: the 8-bit run's final loss (mean of the last 20 batches) was
    2.2% below AdamW's and its weights 1.9% away from AdamW's (relative to their norm); for scale, AdamW with a 1%
    larger rate moved the loss by 1.7% and the weights by 0.3%. Asserted: loss within 5%, weights within 4%, and
    both runs cut the loss at least 20-fold."""
    rng = np.random.RandomState(0)
    teacher = rng.standard_normal((32, 4)).astype("float32")
    x_all = rng.standard_normal((300, 64, 32)).astype("float32")
    y_all = np.tanh(x_all @ teacher) + 0.01 * rng.standard_normal((300, 64, 4)).astype("float32")

    def mlp():
        paddle.seed(3)
        with paddle.utils.unique_name.guard():
            return paddle.nn.Sequential(paddle.nn.Linear(32, 256), paddle.nn.Tanh(), paddle.nn.Linear(256, 64),
                                        paddle.nn.Tanh(), paddle.nn.Linear(64, 4))

    def train(make_optimizer):
        model = mlp()
        opt = make_optimizer(model.parameters())
        losses = []
        for step in range(300):
            loss = ((model(paddle.to_tensor(x_all[step])) - paddle.to_tensor(y_all[step])) ** 2).mean()
            loss.backward()
            opt.step()
            opt.clear_grad()
            losses.append(float(loss))
        return np.mean(losses[-20:]), np.mean(losses[:5]), model, opt

    loss8, first8, model8, opt8 = train(lambda ps: AdamW8bit(3e-3, ps, weight_decay=0.01))
    loss32, first32, model32, _ = train(lambda ps: paddle.optimizer.AdamW(3e-3, parameters=ps, weight_decay=0.01))
    assert sum(opt8.is_quantized(p) for p in model8.parameters()) == 2
    assert first8 > 20 * loss8 and first32 > 20 * loss32
    assert abs(loss8 - loss32) <= 0.05 * loss32, (loss8, loss32)
    w8 = np.concatenate([p.numpy().reshape(-1) for p in model8.parameters()])
    w32 = np.concatenate([p.numpy().reshape(-1) for p in model32.parameters()])
    assert np.linalg.norm(w8 - w32) <= 0.04 * np.linalg.norm(w32), np.linalg.norm(w8 - w32) / np.linalg.norm(w32)


def test_zero_multiplier_freezes_and_found_inf_skips():
    net = make_net()
    frozen = net.hidden.weight
    frozen.optimize_attr["learning_rate"] = 0.0  # --stop_text_encoder_training
    opt = AdamW8bit(0.01, net.parameters())
    before = frozen.numpy().copy()
    backward(net, 0)
    opt.step()
    opt.clear_grad()
    assert np.array_equal(frozen.numpy(), before) and frozen.name not in opt._state
    frozen.optimize_attr["learning_rate"] = 1.0
    backward(net, 1)
    opt.step()
    opt.clear_grad()
    state = {k: v.numpy().copy() for k, v in opt.state_dict().items() if isinstance(v, paddle.Tensor)}
    weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    backward(net, 2)
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(True))
    opt.step()
    assert all(np.array_equal(v.numpy(), weights[k]) for k, v in net.state_dict().items())
    assert all(np.array_equal(v.numpy(), state[k]) for k, v in opt.state_dict().items() if k in state)


def test_bfloat16_parameters_get_8bit_state_and_float32_master_weights():
    rng = np.random.RandomState(0)
    layer = paddle.nn.Linear(64, 80)
    layer.to(dtype="bfloat16")
    param = layer.weight
    target = paddle.to_tensor(rng.standard_normal((64, 80)).astype("float32"))
    opt = AdamW8bit(0.05, [param], weight_decay=0.0, multi_precision=True)
    ref = NumpyAdamW8bit(0.05)
    weights = param.astype("float32").numpy().astype(np.float64)
    for _ in range(4):
        ((param.astype("float32") - target) ** 2).sum().backward()
        grad = param.grad.astype("float32").numpy().astype(np.float64)
        opt.step()
        opt.clear_grad()
        state = opt.state_dict()
        codes = {kind: state[f"{param.name}_adamw8bit_{kind}_codes"].numpy() for kind in ("exp_avg", "exp_avg_sq")}
        weights = ref.step("p", weights, grad, their_codes=codes)
    assert param.dtype == paddle.bfloat16
    master = opt.state_dict()["master_weights"][param.name]
    assert master.dtype == paddle.float32
    np.testing.assert_allclose(master.numpy(), weights, rtol=1e-5, atol=1e-5)
    assert np.array_equal(param.astype("float32").numpy(), master.astype("bfloat16").astype("float32").numpy())


# (2) checkpoints ------------------------------------------------------------------------------------------------

def test_state_dict_is_a_quarter_of_adamws_for_large_parameters(tmp_path):
    """Saved and loaded back as PaddleNLP's Trainer does: 2 bytes + 2 absmax per 256 values, against AdamW's 8."""
    def saved_bytes(opt, name):
        paddle.seed(0)
        path = str(tmp_path / name)
        paddle.save(opt.state_dict(), path)
        return sum(v.nbytes for v in paddle.load(path, return_numpy=True).values() if isinstance(v, np.ndarray)), path

    sizes = {}
    for name, make in (("8bit", lambda ps: AdamW8bit(1e-3, ps)),
                       ("adamw", lambda ps: paddle.optimizer.AdamW(1e-3, parameters=ps))):
        paddle.seed(0)
        layer = paddle.nn.Linear(512, 1024, bias_attr=False)
        opt = make(layer.parameters())
        layer(paddle.randn([4, 512])).mean().backward()
        opt.step()
        sizes[name], path = saved_bytes(opt, name + ".pdopt")
        sizes[name + " file"] = os.path.getsize(path)
    numel = 512 * 1024
    assert sizes["adamw"] >= 8 * numel
    assert sizes["8bit"] == 2 * numel + 2 * 4 * numel // BLOCK_SIZE + 8 + 8  # codes, absmax, step, block size
    assert 0.25 <= sizes["8bit"] / sizes["adamw"] <= 0.26
    assert 0.25 <= sizes["8bit file"] / sizes["adamw file"] <= 0.26


def test_resume_from_saved_state_is_bit_identical(tmp_path):
    def new_optimizer(net):
        net.out.weight.optimize_attr["learning_rate"] = 0.5
        return AdamW8bit(0.02, net.parameters(), weight_decay=0.1, apply_decay_param_fun=lambda n: n.endswith("w_0"),
                         grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5)), None

    def train(net, opt, _, steps):
        for step in steps:
            backward(net, step)
            opt.step()
            opt.clear_grad()

    continued_state, _, _ = resume_matches_uninterrupted(tmp_path, make_net, new_optimizer, train, 5, 10)
    assert continued_state["linear_0.w_0_adamw8bit_exp_avg_codes"].dtype == np.uint8
    assert continued_state["linear_1.w_0_adamw8bit_exp_avg"].dtype == np.float32  # small: float32 state


def test_set_state_dict_checks_what_it_loads():
    net = make_net()
    opt = AdamW8bit(0.01, net.parameters())
    backward(net, 0)
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match="not an AdamW8bit state dict"):
        AdamW8bit(0.01, make_net().parameters()).set_state_dict({"linear_0.w_0_moment1_0": paddle.zeros([1])})
    with pytest.raises(ValueError, match="blocks of 256 values, this optimizer blocks of 2048"):
        AdamW8bit(0.01, make_net().parameters(), block_size=2048).set_state_dict(state)
    broken = {k: v for k, v in state.items() if not k.endswith("exp_avg_sq_absmax")}
    with pytest.raises(ValueError, match="linear_0.w_0_adamw8bit_exp_avg_sq_absmax missing"):
        AdamW8bit(0.01, make_net().parameters()).set_state_dict(broken)
    fresh = AdamW8bit(0.01, make_net().parameters())
    fresh.set_state_dict(state)
    state["linear_0.w_0_adamw8bit_exp_avg_codes"][:] = 7  # a copy was loaded, not the tensor itself
    assert not np.all(fresh._state["linear_0.w_0"]["exp_avg_codes"].numpy() == 7)


# (3) the flag and the Trainer -------------------------------------------------------------------

def test_optim_flag_parses_and_refuses_sharding(tmp_path):
    from ppdreambooth.config.parsing import parse_args
    from ppdreambooth.errors import ConfigError

    required = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "photos",
                "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out")]
    args = parse_args(required + ["--optim", "adamw_8bit", "--learning_rate", "2e-6"])[2]
    assert args.optim == "adamw_8bit" and args.learning_rate == 2e-6
    with pytest.raises(ConfigError, match="--optim adamw_8bit does not run with --sharding"):
        parse_args(required + ["--optim", "adamw_8bit", "--sharding", "stage1"])


def test_paddlenlp_trainer_builds_it_with_adamws_arguments_and_resumes_exactly(tmp_path):
    from paddlenlp.trainer import Trainer

    from ppdreambooth.config.arguments import DreamBoothTrainingArguments
    from ppdreambooth.modeling.clipping import GlobalNormClip
    from ppdreambooth.training.trainer import DreamBoothTrainer

    class Adam8Trainer(DreamBoothTrainer):  # all of it but the parts that need a diffusion model
        compute_loss = Trainer.compute_loss
        _save = Trainer._save
        _get_train_sampler = Trainer._get_train_sampler

    class Regression(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.b = paddle.nn.Linear(16, 300), paddle.nn.Linear(300, 1)

        def forward(self, x, y):
            return (((self.b(paddle.tanh(self.a(x))) - y) ** 2).mean(),)

    rng = np.random.RandomState(0)
    data = [{"x": rng.standard_normal(16).astype("float32"), "y": rng.standard_normal(1).astype("float32")}
            for _ in range(24)]

    def train(output_dir, resume=None):
        paddle.seed(0)
        with paddle.utils.unique_name.guard():
            model = Regression()
        args = DreamBoothTrainingArguments(
            output_dir=str(output_dir), optim="adamw_8bit", learning_rate=0.01, max_steps=6, save_steps=3,
            logging_steps=3, per_device_train_batch_size=4, lr_scheduler_type="linear", warmup_steps=2,
            weight_decay=0.1, max_grad_norm=0.5, adam_beta2=0.99, seed=0, report_to=[], disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = Adam8Trainer(model=model, args=args, train_dataset=data, base_model="-")
        trainer.train(resume_from_checkpoint=resume)
        opt = trainer.optimizer
        assert type(opt) is AdamW8bit and isinstance(opt._grad_clip, GlobalNormClip)
        assert opt._weight_decay == 0.1 and opt._beta2 == 0.99 and opt.is_quantized(model.a.weight)
        return {k: v.numpy() for k, v in model.state_dict().items()}

    straight = train(tmp_path / "straight")
    saved = paddle.load(str(tmp_path / "straight" / "checkpoint-3" / "optimizer.pdopt"), return_numpy=True)
    assert saved["linear_0.w_0_adamw8bit_exp_avg_codes"].dtype == np.uint8 and "LR_Scheduler" in saved
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    assert all(np.array_equal(resumed[k], v) for k, v in straight.items())
