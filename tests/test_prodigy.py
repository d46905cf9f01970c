"""Prodigy (ppdreambooth.modeling.prodigy): against a NumPy transcription of prodigyopt, rate multipliers,
clipping, checkpoints, low precision, the grad scaler's skip, the sums hook, `--optim prodigy` end to end."""
import math

import numpy as np
import paddle
import pytest

from helpers.optimizer_resume import resume_matches_uninterrupted
from ppdreambooth.modeling.prodigy import Prodigy
from test_optimizers import backward, make_net


class NumpyProdigy:
    """prodigyopt's `Prodigy.step` (slice_p=1, one parameter group, a rate multiplier per parameter as documented
    in the module) in float64 NumPy, over all parameters at once since d is shared."""

    def __init__(self, betas=(0.9, 0.999), beta3=None, eps=1e-8, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
                 decouple=True, use_bias_correction=False, safeguard_warmup=False):
        self.beta1, self.beta2 = betas
        self.beta3 = math.sqrt(self.beta2) if beta3 is None else beta3
        self.eps, self.d0, self.d_coef, self.growth_rate = eps, d0, d_coef, growth_rate
        self.decouple, self.bias_correction, self.safeguard = decouple, use_bias_correction, safeguard_warmup
        self.d, self.d_max, self.d_numerator, self.k = d0, d0, 0.0, 0
        self.state = {}
        self.sums = None  # the last step's (numerator increment, denominator)

    def step(self, params, grads, lr, rates=None, decays=None):
        """New weights from `params` and `grads` (dicts by name; a missing grad: no gradient)."""
        rates, decays = rates or {}, decays or {}
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        d, d0, k = self.d, self.d0, self.k
        bc = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if self.bias_correction else 1.0
        dlr = d * lr * bc
        delta, d_denom, used = 0.0, 0.0, {}
        for name, p in params.items():
            g = grads.get(name)
            m = rates.get(name, 1.0)
            if g is None or not lr * m > 0:
                continue
            decay = decays.get(name, 0.0)
            p, g = p.astype(np.float64), g.astype(np.float64)
            if decay and not self.decouple:
                g = g + decay * p
            st = self.state.setdefault(name, {"p0": p.copy(), "s": 0.0, "v": 0.0, "m": 0.0})
            delta += (d / d0) * dlr * m * float(np.dot(g.ravel(), (st["p0"] - p).ravel()))
            if b1 > 0:
                st["m"] = b1 * st["m"] + d * (1 - b1) * g
            st["v"] = b2 * st["v"] + d * d * (1 - b2) * g * g
            st["s"] = b3 * st["s"] + (d / d0) * (d if self.safeguard else dlr) * m * g
            d_denom += float(np.abs(st["s"]).sum())
            used[name] = (p, g, m, decay)
        self.sums = (delta, d_denom)
        new = dict(params)
        if d_denom == 0:
            return new
        numerator = b3 * self.d_numerator + delta
        d_hat = self.d_coef * numerator / d_denom
        if d == d0:
            d = max(d, d_hat)
        self.d_max = max(self.d_max, d_hat)
        self.d = d = min(self.d_max, d * self.growth_rate)
        self.d_numerator = numerator
        for name, (p, g, m, decay) in used.items():
            st = self.state[name]
            denom = np.sqrt(st["v"]) + d * self.eps
            if decay and self.decouple:
                p = p - decay * dlr * m * p
            if b1 > 0:
                p = p - dlr * m * st["m"] / denom
            else:
                p = p - dlr * m * d * g / denom
            new[name] = p
        self.k = k + 1
        return new


def assert_close(actual, expected, message=""):
    """1e-6 relative, elementwise; entries near zero judged against the tensor's largest entry."""
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale, err_msg=message)


def warmup():
    """lr 0, 0.25, 0.5, 0.75, then 1.0: a first step with nothing to learn from, and safeguard_warmup matters."""
    return paddle.optimizer.lr.LinearWarmup(1.0, warmup_steps=4, start_lr=0.0, end_lr=1.0)


def run_side_by_side(net, opt, ref, steps, scheduler=None, rates_of=lambda step: {}, decays=None, clip=None,
                     before_step=None):
    """Step the optimizer and the reference with the same gradients, comparing the weights and d after every
    step. Each step starts the reference from the model's weights: they are float32, and a float32 weight
    rounded the other way than a float64 one would shift d's numerator (a sum of gradient x distance moved)
    far more than the update's own rounding; the reference keeps its own moments, s, numerator and d."""
    params = [p for p in net.parameters() if not p.stop_gradient]
    history = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        if clip is not None:
            grads = clip(grads)
        weights = {p.name: p.numpy().astype(np.float64) for p in params}
        lr = scheduler.get_lr() if scheduler is not None else opt.get_lr()
        opt.step()
        opt.clear_grad()
        if scheduler is not None:
            scheduler.step()
        expected = ref.step(weights, grads, lr, rates_of(step), decays)
        for p in params:
            assert_close(p.numpy(), expected[p.name], f"{p.name} after step {step + 1}")
        assert opt.d == pytest.approx(ref.d, rel=1e-5), f"d after step {step + 1}"
        history.append(opt.d)
    return history


CASES = {
    "defaults": {},
    "safeguard_warmup": {"safeguard_warmup": True},
    "bias_correction": {"use_bias_correction": True, "d_coef": 2.0},
    "no_first_moment": {"betas": (0.0, 0.999)},
    "coupled_decay": {"decouple": False},
    "growth_rate": {"d0": 1e-4, "growth_rate": 1.5},
}


# (1) the formula ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_equal_numpy_transcription(case, weight_decay):
    options = CASES[case]
    net = make_net()
    assert sorted(len(p.shape) for p in net.parameters()) == [1, 1, 2, 4]  # conv, linear, two biases
    decayed = {net.conv.weight.name, net.linear.weight.name}  # the biases are exempt
    scheduler = warmup()
    opt = Prodigy(scheduler, net.parameters(), weight_decay=weight_decay,
                  apply_decay_param_fun=lambda name: name in decayed, **options)
    ref = NumpyProdigy(**options)
    decays = {name: weight_decay for name in decayed}
    history = run_side_by_side(net, opt, ref, steps=12, scheduler=scheduler, decays=decays)

    d0 = options.get("d0", 1e-6)
    assert history[0] == d0 and opt._k == 11  # the first step (lr 0) had nothing to learn from: no step
    assert opt.d > 2.5 * d0, history  # d grew: a fixed d would fail the weight comparison above too
    if "growth_rate" in options:  # the first move away from d0 is free, later ones at most x1.5
        moved = [d for d in history if d != d0]
        ratios = [b / a for a, b in zip(moved, moved[1:])]
        assert max(ratios) == pytest.approx(1.5) and opt._d_max > opt.d  # the growth limit was what held d
    state = opt.state_dict()
    for p in net.parameters():
        st = ref.state[p.name]
        kinds = {"s": st["s"], "exp_avg_sq": st["v"]}
        if options.get("betas", (0.9,))[0] > 0:
            kinds["exp_avg"] = st["m"]
        for kind, value in kinds.items():
            np.testing.assert_allclose(state[f"{p.name}_prodigy_{kind}"].numpy(), value, rtol=1e-5,
                                       atol=1e-5 * np.abs(value).max(), err_msg=kind)
        if p.name in decayed:
            assert np.array_equal(state[f"{p.name}_prodigy_p0"].numpy(), st["p0"].astype(np.float32))
        else:  # biases start at zero: their p0 is a single 0
            assert state[f"{p.name}_prodigy_p0"].shape == [] and not st["p0"].any()
    assert float(state["prodigy_d_numerator"]) == pytest.approx(ref.d_numerator, rel=1e-5)


def test_fixed_step_size_would_be_caught():
    """The comparison above is not blind to d: with d pinned at d0 the weights leave the reference."""
    net = make_net()
    opt = Prodigy(1.0, net.parameters(), growth_rate=1.0)  # d can never leave d0
    with pytest.raises(AssertionError):
        run_side_by_side(net, opt, NumpyProdigy(), steps=12)


# (2) rate multipliers ----------------------------------------------------------------------------------

def test_a_zero_multiplier_freezes_the_parameter_and_leaves_d_as_if_it_were_absent():
    def train(freeze_by_multiplier):
        net = make_net()
        if freeze_by_multiplier:
            net.conv.bias.optimize_attr["learning_rate"] = 0.0
        else:
            net.conv.bias.stop_gradient = True  # not trained at all
        opt = Prodigy(1.0, net.parameters(), weight_decay=0.1)
        for step in range(8):
            backward(net, step)
            assert freeze_by_multiplier == (net.conv.bias.grad is not None)
            opt.step()
            opt.clear_grad()
        return net, opt

    frozen, opt = train(True)
    absent, opt_absent = train(False)
    assert not frozen.conv.bias.numpy().any()  # still its initial zeros, bit for bit
    assert frozen.conv.bias.name not in opt._state  # and no state for it
    for name, value in frozen.state_dict().items():
        assert np.array_equal(value.numpy(), absent.state_dict()[name].numpy()), name
    assert opt.d == opt_absent.d and opt._d_numerator == opt_absent._d_numerator and opt.d > 5e-6


def test_multipliers_half_and_switched_to_zero_match_the_reference():
    net = make_net()
    net.linear.weight.optimize_attr["learning_rate"] = 0.5
    opt = Prodigy(1.0, net.parameters(), weight_decay=0.5, d0=1e-4)  # steps large enough to show the decay's rate
    conv_bias = net.conv.bias
    saved = {}

    def before_step(step):
        if step == 5:  # how --stop_text_encoder_training freezes the text encoder mid-run
            conv_bias.optimize_attr["learning_rate"] = 0.0
            saved["bias"] = conv_bias.numpy().copy()
            saved["state"] = {k: v.numpy().copy() for k, v in opt._state[conv_bias.name].items() if k != "step"}

    def rates_of(step):
        return {net.linear.weight.name: 0.5, conv_bias.name: 0.0 if step >= 5 else 1.0}

    ref = NumpyProdigy(d0=1e-4)
    run_side_by_side(net, opt, ref, steps=10, rates_of=rates_of, before_step=before_step,
                     decays={p.name: 0.5 for p in net.parameters()})
    assert np.array_equal(conv_bias.numpy(), saved["bias"])
    for kind, value in saved["state"].items():
        assert np.array_equal(opt._state[conv_bias.name][kind].numpy(), value), kind
    assert opt._state[conv_bias.name]["step"] == 5
    assert opt.d > 4e-4


# (3) gradient clipping ----------------------------------------------------------------------------------

def test_global_norm_clipping_is_over_all_parameters():
    clip_norm = 0.05
    net = make_net()
    opt = Prodigy(1.0, net.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(clip_norm))
    factors = []

    def clip_globally(grads):
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        factors.append(clip_norm / max(norm, clip_norm))
        return {k: g * factors[-1] for k, g in grads.items()}

    # After the first step s = d0 * lr * (clipped gradient): it shows the factor each parameter got.
    backward(net, 0)
    raw = {p.name: p.grad.numpy().astype(np.float64) for p in net.parameters()}
    opt.step()
    opt.clear_grad()
    factor = clip_norm / math.sqrt(sum(float((g * g).sum()) for g in raw.values()))
    assert factor < 0.5
    own_factor_differs = 0
    for name, grad in raw.items():
        s = opt._state[name]["s"].numpy()
        np.testing.assert_allclose(s, 1e-6 * factor * grad, rtol=1e-5, atol=1e-12 * factor * np.abs(grad).max())
        per_parameter = clip_norm / max(np.linalg.norm(grad), clip_norm)  # what clipping each on its own gives
        if per_parameter > 2 * factor:
            own_factor_differs += 1
            assert not np.allclose(s, 1e-6 * per_parameter * grad, rtol=0.5, atol=0)
    assert own_factor_differs >= 2

    # And ten steps follow the reference fed globally clipped gradients.
    net2 = make_net()
    opt2 = Prodigy(1.0, net2.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(clip_norm))
    run_side_by_side(net2, opt2, NumpyProdigy(), steps=10, clip=clip_globally)
    assert all(f < 1.0 for f in factors) and opt2.d > 1e-5


# (4) checkpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_resume_from_saved_state_is_bit_identical(tmp_path, beta1):
    def new_optimizer(net):
        net.linear.weight.optimize_attr["learning_rate"] = 0.5
        scheduler = warmup()
        opt = Prodigy(scheduler, net.parameters(), betas=(beta1, 0.999), weight_decay=0.1,
                      apply_decay_param_fun=lambda name: name.endswith("w_0"), safeguard_warmup=True,
                      grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
        return opt, scheduler

    def train(net, opt, scheduler, steps):
        for step in steps:
            backward(net, step)
            opt.step()
            opt.clear_grad()
            scheduler.step()

    continued_state, _, _ = resume_matches_uninterrupted(tmp_path, make_net, new_optimizer, train, 5, 10)
    assert int(continued_state["prodigy_k"]) == 9 and continued_state["prodigy_d"] > 2e-6
    assert continued_state["prodigy_d"].dtype == np.float64
    assert ("linear_0.w_0_prodigy_exp_avg" in continued_state) == (beta1 > 0)


def test_set_state_dict_copies_and_checks():
    net = make_net()
    opt = Prodigy(1.0, net.parameters())
    for step in range(2):
        backward(net, step)
        opt.step()
        opt.clear_grad()
    saved = opt.state_dict()
    key = net.linear.weight.name + "_prodigy_s"
    before = saved[key].numpy().copy()
    other = Prodigy(1.0, net.parameters())
    other.set_state_dict(saved)
    assert other.d == opt.d and other._k == 2 and other._d_numerator == opt._d_numerator
    backward(net, 2)
    other.step()
    assert np.array_equal(saved[key].numpy(), before)  # the loaded optimizer does not write into the dict

    for broken, message in ((dict(saved, **{key: paddle.zeros([5])}), "shape"),
                            ({k: v for k, v in saved.items() if k != key}, "missing"),
                            ({k: v for k, v in saved.items() if k != "prodigy_d"}, "prodigy_d missing")):
        with pytest.raises(ValueError, match=message):
            Prodigy(1.0, net.parameters()).set_state_dict(broken)
    adamw = paddle.optimizer.AdamW(0.05, parameters=net.parameters())
    backward(net, 3)
    adamw.step()
    with pytest.raises(ValueError, match="not a Prodigy state dict"):
        Prodigy(1.0, net.parameters()).set_state_dict(adamw.state_dict())


# (5) low precision ----------------------------------------------------------------------------------------

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
    opt_plain = Prodigy(1.0, [plain], d0=1e-2)  # steps large enough to show in bf16
    opt_master = Prodigy(1.0, [master], d0=1e-2, multi_precision=True)  # what PaddleNLP passes under O2
    ref = NumpyProdigy(d0=1e-2)
    expected = {"p": master.astype("float32").numpy().astype(np.float64)}
    for step in range(4):
        for param in (plain, master):
            ((param.astype("float32") - target) ** 2).sum().backward()
        grad = master.grad.astype("float32").numpy()
        opt_plain.step()
        opt_master.step()
        opt_plain.clear_grad()
        opt_master.clear_grad()
        expected = ref.step(expected, {"p": grad}, 1.0)
    assert plain.dtype == paddle.bfloat16 and master.dtype == paddle.bfloat16
    state = opt_master.state_dict()
    for kind in ("p0", "s", "exp_avg", "exp_avg_sq"):
        assert state[f"{master.name}_prodigy_{kind}"].dtype == paddle.float32, kind
        assert opt_plain.state_dict()[f"{plain.name}_prodigy_{kind}"].dtype == paddle.float32, kind
    fp32_master = state["master_weights"][master.name]
    assert fp32_master.dtype == paddle.float32
    np.testing.assert_allclose(fp32_master.numpy(), expected["p"], rtol=1e-4, atol=1e-5)
    assert opt_master.d == pytest.approx(ref.d, rel=1e-4) and ref.d > 1e-2
    np.testing.assert_allclose(master.astype("float32").numpy(), expected["p"], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(plain.astype("float32").numpy(), expected["p"], rtol=2e-2, atol=2e-2)
    assert "master_weights" not in opt_plain.state_dict()


# (6) the grad scaler's skip ---------------------------------------------------------------------------------

def test_step_is_skipped_when_the_grad_scaler_found_inf():
    net = make_net()
    opt = Prodigy(1.0, net.parameters())
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    backward(net, 0)
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(True))  # as paddle.amp.GradScaler.step does
    opt.step()
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in net.state_dict().items())
    assert opt._state == {} and opt._k == 0 and opt.d == 1e-6 and opt._d_numerator == 0.0
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(False))
    opt.step()
    assert not np.array_equal(net.linear.weight.numpy(), before["linear.weight"]) and opt._k == 1


# The sums hook (sharding) -----------------------------------------------------------------------------------

def test_sums_hook_gets_the_local_sums_and_sharded_all_reduces_them(monkeypatch):
    calls = []

    class Recording(Prodigy):
        def _global_sums(self, numerator, denominator):
            calls.append((numerator, denominator))
            return super()._global_sums(numerator, denominator)

    net = make_net()
    ref = NumpyProdigy()
    opt = Recording(1.0, net.parameters())
    params = list(net.parameters())
    for step in range(6):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        weights = {p.name: p.numpy().astype(np.float64) for p in params}
        opt.step()
        opt.clear_grad()
        ref.step(weights, grads, 1.0)
        assert len(calls) == step + 1
        assert calls[-1][0] == pytest.approx(ref.sums[0], rel=1e-5, abs=1e-30)
        assert calls[-1][1] == pytest.approx(ref.sums[1], rel=1e-6)

    # sharded=True: the sums go through paddle.distributed.all_reduce over the given group. Two ranks holding
    # identical shares double both sums, which leaves d unchanged.
    reduced = []
    group = object()

    def fake_all_reduce(tensor, group=None, **kwargs):
        reduced.append((tensor.numpy().copy(), group, tensor.dtype))
        tensor.set_value(tensor * 2)

    monkeypatch.setattr(paddle.distributed, "all_reduce", fake_all_reduce)
    plain_net, sharded_net = make_net(), make_net()
    plain = Prodigy(1.0, plain_net.parameters())
    sharded = Prodigy(1.0, sharded_net.parameters(), sharded=True, group=group)
    for step in range(6):
        previous = plain._d_numerator
        for net_, opt_ in ((plain_net, plain), (sharded_net, sharded)):
            backward(net_, step)
            opt_.step()
            opt_.clear_grad()
        local_numerator, local_denominator = reduced[-1][0]  # what this rank handed over: its own sums
        assert reduced[-1][1] is group and reduced[-1][2] == paddle.float64
        assert local_numerator == pytest.approx(plain._d_numerator - math.sqrt(0.999) * previous, rel=1e-9, abs=1e-30)
        assert local_denominator == pytest.approx(plain._d_denom, rel=1e-12)
        assert sharded._d_denom == pytest.approx(2 * plain._d_denom, rel=1e-12)
        assert sharded.d == pytest.approx(plain.d, rel=1e-9)
    assert len(reduced) == 6 and plain.d > 3e-6

    # A rank with no gradient of its own still joins the reduction (the others wait for it) and takes their d.
    idle_net = make_net()
    idle = Prodigy(1.0, idle_net.parameters(), sharded=True)
    monkeypatch.setattr(paddle.distributed, "all_reduce",
                        lambda tensor, group=None, **kw: tensor.set_value(paddle.to_tensor([2e-12, 1e-6], "float64")))
    idle.step()
    assert idle._k == 1 and idle.d == pytest.approx(2e-6) and idle._state == {}


# (7) `--optim prodigy` through the arguments and PaddleNLP's Trainer --------------------------------------

def test_optim_flag_parses_and_refuses_what_it_should(tmp_path):
    from paddlenlp.trainer.trainer_utils import OptimizerNames

    from ppdreambooth.config.parsing import parse_args
    from ppdreambooth.errors import ConfigError

    required = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "photos",
                "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out")]
    args = parse_args(required + ["--optim", "prodigy", "--prodigy_d_coef", "0.5", "--prodigy_safeguard_warmup",
                                  "true"])[2]
    assert args.optim == "prodigy" and args.learning_rate == 1.0  # Prodigy's rate defaults to 1.0
    assert args.prodigy_d_coef == 0.5 and args.prodigy_safeguard_warmup and not args.prodigy_use_bias_correction
    assert parse_args(required + ["--optim", "prodigy", "--learning_rate", "0.5"])[2].learning_rate == 0.5
    assert parse_args(required + ["--optim", "prodigy", "--use_lora"])[2].learning_rate == 1.0
    assert parse_args(required)[2].optim == OptimizerNames.ADAMW  # unchanged
    assert parse_args(required + ["--optim", "adafactor"])[2].optim == OptimizerNames.ADAFACTOR
    with pytest.raises(ConfigError, match="invalid choice: 'sgd'.*prodigy"):
        parse_args(required + ["--optim", "sgd"])
    with pytest.raises(ConfigError, match="--prodigy_d_coef only acts with --optim prodigy"):
        parse_args(required + ["--prodigy_d_coef", "2"])
    with pytest.raises(ConfigError, match=r"--prodigy_d_coef 0(\.0)? is out of range"):
        parse_args(required + ["--optim", "prodigy", "--prodigy_d_coef", "0"])
    with pytest.raises(ConfigError, match="does not run with --sharding"):
        parse_args(required + ["--optim", "prodigy", "--sharding", "stage1"])


def test_paddlenlp_trainer_builds_saves_and_resumes_it(tmp_path):
    """The real Trainer with DreamBoothTrainer's create_optimizer and log: `--optim prodigy` builds Prodigy with
    the Trainer's schedule, weight decay and clipping, optimizer.pdopt holds its state, and a resume is exact."""
    from paddlenlp.trainer import Trainer, TrainerCallback

    from ppdreambooth.config.arguments import DreamBoothTrainingArguments
    from ppdreambooth.modeling.clipping import GlobalNormClip
    from ppdreambooth.training.trainer import DreamBoothTrainer

    class ProdigyTrainer(DreamBoothTrainer):  # all of it but the parts that need a diffusion model
        compute_loss = Trainer.compute_loss
        _save = Trainer._save
        _get_train_sampler = Trainer._get_train_sampler

    class Regression(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = paddle.nn.Linear(4, 8), paddle.nn.LayerNorm(8), paddle.nn.Linear(8, 1)

        def forward(self, x, y):
            return (((self.b(self.norm(self.a(x))) - y) ** 2).mean(),)

    class Logs(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    rng = np.random.RandomState(0)
    data = [{"x": rng.standard_normal(4).astype("float32"), "y": rng.standard_normal(1).astype("float32")}
            for _ in range(32)]

    def train(output_dir, resume=None):
        paddle.seed(0)
        with paddle.utils.unique_name.guard():
            model = Regression()
        args = DreamBoothTrainingArguments(
            output_dir=str(output_dir), optim="prodigy", prodigy_d_coef=2.0, learning_rate=1.0, max_steps=6,
            save_steps=3, logging_steps=3, per_device_train_batch_size=4, lr_scheduler_type="linear",
            warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5, seed=0, report_to=[], disable_tqdm=True,
            dataloader_num_workers=0)
        logs = Logs()
        trainer = ProdigyTrainer(model=model, args=args, train_dataset=data, callbacks=[logs], base_model="-")
        trainer.train(resume_from_checkpoint=resume)
        opt = trainer.optimizer
        assert type(opt) is Prodigy and isinstance(opt._grad_clip, GlobalNormClip)
        assert opt._d_coef == 2.0 and opt._weight_decay == 0.1 and opt._k == 5  # the first step has lr 0
        assert opt._state[model.a.weight.name]["step"] == 5 and opt.d > 1e-6
        assert [entry["prodigy_d"] for entry in logs.logs if "loss" in entry][-1] == opt.d
        return {k: v.numpy() for k, v in model.state_dict().items()}, opt

    straight, opt = train(tmp_path / "straight")
    saved = paddle.load(str(tmp_path / "straight" / "checkpoint-3" / "optimizer.pdopt"))
    assert int(saved["linear_0.w_0_prodigy_step"]) == 2 and int(saved["prodigy_k"]) == 2 and "LR_Scheduler" in saved
    resumed, resumed_opt = train(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for name, value in straight.items():
        assert np.array_equal(resumed[name], value), name
    assert resumed_opt.d == opt.d and resumed_opt._d_numerator == opt._d_numerator
