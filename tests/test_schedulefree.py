"""Schedule-free AdamW (ppdreambooth.modeling.schedulefree): against a float64 NumPy transcription of the published
algorithm (y, z and x), eval()/train(), exact resume, rate multipliers, `--optim adamw_schedulefree` end to end."""
import os

import numpy as np
import paddle
import pytest

from helpers.optimizer_resume import resume_matches_uninterrupted
from helpers.runs import run_module, train_argv, truncate_run_to
from ppdreambooth.modeling.schedulefree import AdamWScheduleFree
from test_optimizers import backward, make_net


class NumpyScheduleFree:
    """The algorithm in the explicit form of the paper and of the reference's `AdamWScheduleFreeReference` (x, y
    and z all held, float64), one optimizer-wide step counter and average weight; a rate multiplier per parameter
    scales its step (module docstring)."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, weight_lr_power=2.0):
        self.lr, self.beta1, self.beta2, self.eps = lr, betas[0], betas[1], eps
        self.warmup_steps, self.power = warmup_steps, weight_lr_power
        self.k, self.weight_sum, self.lr_max = 0, 0.0, -1.0
        self.state = {}  # name -> {"x", "y", "z", "v"}

    def step(self, params, grads, rates=None, decays=None):
        rates, decays = rates or {}, decays or {}
        k = self.k
        sched = (k + 1) / self.warmup_steps if k < self.warmup_steps else 1.0
        lr = self.lr * sched
        self.lr_max = max(lr, self.lr_max)
        weight = self.lr_max ** self.power
        self.weight_sum += weight
        c = weight / self.weight_sum if self.weight_sum else 0.0
        for name, p in params.items():
            m = rates.get(name, 1.0)
            if name not in grads or not m > 0:
                continue
            g = grads[name].astype(np.float64)
            st = self.state.setdefault(name, {key: p.astype(np.float64).copy() for key in "xyz"})
            st.setdefault("v", np.zeros_like(g))
            st["v"] = self.beta2 * st["v"] + (1 - self.beta2) * g * g
            denom = np.sqrt(st["v"] / (1 - self.beta2 ** (k + 1))) + self.eps
            st["z"] = st["z"] - lr * m * (g / denom + decays.get(name, 0.0) * st["y"])
            st["x"] = (1 - c) * st["x"] + c * st["z"]
            st["y"] = (1 - self.beta1) * st["z"] + self.beta1 * st["x"]
        self.k = k + 1
        return c


def assert_close(actual, expected, message=""):
    """1e-6 relative, elementwise; entries near zero judged against the tensor's largest entry."""
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale, err_msg=message)


def x_of(opt, params):
    """The evaluation weights, through eval() (and back)."""
    opt.eval()
    x = {p.name: p.numpy().copy() for p in params}
    opt.train()
    return x


# (1) the formula ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup_steps", [0, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_equal_numpy_transcription_in_y_z_and_x(weight_decay, warmup_steps):
    net = make_net()
    params = list(net.parameters())
    assert sorted(len(p.shape) for p in params) == [1, 1, 2, 4]  # conv, linear, two biases
    decayed = {net.conv.weight.name, net.linear.weight.name}  # the biases are exempt
    opt = AdamWScheduleFree(0.01, params, weight_decay=weight_decay, warmup_steps=warmup_steps,
                            apply_decay_param_fun=lambda name: name in decayed)
    ref = NumpyScheduleFree(0.01, warmup_steps=warmup_steps)
    decays = {name: weight_decay for name in decayed}
    weights = {p.name: p.numpy().astype(np.float64) for p in params}
    cs = []
    for step in range(12):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        opt.step()
        opt.clear_grad()
        cs.append(ref.step(weights, grads, decays=decays))
        assert opt.last_c == pytest.approx(cs[-1], rel=1e-12)
        state = opt.state_dict()
        x = x_of(opt, params)
        for p in params:
            st = ref.state[p.name]
            assert_close(p.numpy(), st["y"], f"y of {p.name} after step {step + 1}")
            assert_close(state[f"{p.name}_schedulefree_z"].numpy(), st["z"], f"z of {p.name} after step {step + 1}")
            assert_close(x[p.name], st["x"], f"x of {p.name} after step {step + 1}")
            assert_close(state[f"{p.name}_schedulefree_exp_avg_sq"].numpy(), st["v"], f"v of {p.name}")
    if warmup_steps:  # c_{k+1} = lr_k^2 / sum lr_i^2 with lr_k = (k + 1) / 4 * lr during the warmup
        squares = [((k + 1) / 4) ** 2 for k in range(4)] + [1.0] * 8
        assert cs == pytest.approx([s / sum(squares[:i + 1]) for i, s in enumerate(squares)], rel=1e-12)
    else:
        assert cs == pytest.approx([1 / (k + 1) for k in range(12)], rel=1e-12)
    for p in params:  # the three sequences really differ: a comparison of y alone could not tell them apart
        st = ref.state[p.name]
        assert np.abs(st["x"] - st["y"]).max() > 1e-4 and np.abs(st["z"] - st["y"]).max() > 1e-4
    assert int(opt.state_dict()["schedulefree_k"]) == 12


# (2) eval() / train() ---------------------------------------------------------------------------------------

def test_eval_gives_x_and_train_restores_y_bit_for_bit():
    net = make_net()
    params = list(net.parameters())
    opt = AdamWScheduleFree(0.01, params, weight_decay=0.1, warmup_steps=2)
    opt.eval()  # before any step: nothing to swap, x = y
    assert not opt.training
    opt.train()
    for step in range(6):
        backward(net, step)
        opt.step()
        opt.clear_grad()
    y = {p.name: p.numpy().copy() for p in params}
    z = {p.name: opt.state_dict()[f"{p.name}_schedulefree_z"].numpy().astype(np.float64) for p in params}
    for _ in range(3):  # repeated round trips, and a second eval()/train() is a no-op
        opt.eval()
        opt.eval()
        assert not opt.training
        for p in params:  # x = (y - (1 - beta1) z) / beta1
            expected = (y[p.name].astype(np.float64) - 0.1 * z[p.name]) / 0.9
            assert_close(p.numpy(), expected, p.name)
            assert not np.array_equal(p.numpy(), y[p.name])
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.step()
        opt.train()
        opt.train()
        assert opt.training
        for p in params:
            assert np.array_equal(p.numpy(), y[p.name]), p.name
    with opt.evaluation_weights():
        assert not np.array_equal(params[0].numpy(), y[params[0].name])
    assert all(np.array_equal(p.numpy(), y[p.name]) for p in params)
    # training continues exactly as without the round trips
    twin_net = make_net()
    twin = AdamWScheduleFree(0.01, list(twin_net.parameters()), weight_decay=0.1, warmup_steps=2)
    for step in range(8):
        backward(twin_net, step)
        twin.step()
        twin.clear_grad()
        if step >= 6:
            backward(net, step)
            opt.step()
            opt.clear_grad()
    for a, b in zip(params, twin_net.parameters()):
        assert np.array_equal(a.numpy(), b.numpy())


# (3) checkpoints ----------------------------------------------------------------------------------------

def test_resume_from_saved_state_is_bit_identical(tmp_path):
    def new_optimizer(net):
        net.linear.weight.optimize_attr["learning_rate"] = 0.5
        return AdamWScheduleFree(0.02, net.parameters(), weight_decay=0.1, warmup_steps=3,
                                 apply_decay_param_fun=lambda name: name.endswith("w_0"),
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5)), None

    def train(net, opt, _, steps):
        for step in steps:
            backward(net, step)
            opt.step()
            opt.clear_grad()
            if step == 3:  # a validation in between changes nothing
                with opt.evaluation_weights():
                    pass

    # y is what the Trainer saves (in train mode)
    continued_state, (net, opt), (resumed_net, resumed_opt) = resume_matches_uninterrupted(
        tmp_path, make_net, new_optimizer, train, 5, 10)
    continued_x = x_of(opt, list(net.parameters()))
    resumed_x = x_of(resumed_opt, list(resumed_net.parameters()))
    assert all(np.array_equal(resumed_x[k], continued_x[k]) for k in continued_x)
    assert int(continued_state["schedulefree_k"]) == 10
    assert continued_state["schedulefree_weight_sum"].dtype == np.float64

    with pytest.raises(ValueError, match="not a schedule-free AdamW state dict"):
        new_optimizer(make_net())[0].set_state_dict({"linear_0.w_0_moment1_0": paddle.zeros([1])})


# (4) rate multipliers ---------------------------------------------------------------------------------------

def test_a_zero_multiplier_freezes_the_parameter_and_others_follow_the_reference():
    net = make_net()
    params = list(net.parameters())
    frozen, half = net.conv.weight, net.linear.weight
    frozen.optimize_attr["learning_rate"] = 0.0  # the text encoder after --stop_text_encoder_training
    half.optimize_attr["learning_rate"] = 0.5  # a --text_encoder_learning_rate of half the rate
    before = frozen.numpy().copy()
    opt = AdamWScheduleFree(0.01, params, weight_decay=0.1, warmup_steps=2)
    ref = NumpyScheduleFree(0.01, warmup_steps=2)
    rates = {frozen.name: 0.0, half.name: 0.5}
    decays = {p.name: 0.1 for p in params}
    weights = {p.name: p.numpy().astype(np.float64) for p in params}
    for step in range(8):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        opt.step()
        opt.clear_grad()
        ref.step(weights, grads, rates=rates, decays=decays)
    x = x_of(opt, params)
    assert np.array_equal(frozen.numpy(), before) and np.array_equal(x[frozen.name], before)
    assert frozen.name not in opt._state
    for p in params:
        if p is not frozen:
            assert_close(p.numpy(), ref.state[p.name]["y"], p.name)
            assert_close(x[p.name], ref.state[p.name]["x"], p.name)
    # a multiplier dropping to 0 mid-run: y, z and v stay, so x stays too
    frozen.optimize_attr["learning_rate"] = 1.0
    half.optimize_attr["learning_rate"] = 0.0
    state_before = {k: v.numpy().copy() for k, v in opt.state_dict().items() if half.name in k}
    y_before, x_before = half.numpy().copy(), x[half.name]
    backward(net, 8)
    opt.step()
    opt.clear_grad()
    assert np.array_equal(half.numpy(), y_before) and np.array_equal(x_of(opt, params)[half.name], x_before)
    assert all(np.array_equal(opt.state_dict()[k].numpy(), v) for k, v in state_before.items())
    assert not np.array_equal(frozen.numpy(), before)  # and the other one moves now


def test_global_norm_clipping_is_once_over_all_parameters():
    net = make_net()
    params = list(net.parameters())
    opt = AdamWScheduleFree(0.01, params, grad_clip=paddle.nn.ClipGradByGlobalNorm(0.05))
    ref = NumpyScheduleFree(0.01)
    weights = {p.name: p.numpy().astype(np.float64) for p in params}
    for step in range(6):
        backward(net, step)
        grads = {p.name: p.grad.numpy().astype(np.float64) for p in params}
        norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        assert norm > 0.05  # it does clip
        grads = {k: g * 0.05 / norm for k, g in grads.items()}
        opt.step()
        opt.clear_grad()
        ref.step(weights, grads)
        for p in params:
            assert_close(p.numpy(), ref.state[p.name]["y"], f"{p.name} after step {step + 1}")


# (5) precision and the grad scaler ----------------------------------------------------------------------------

def test_bfloat16_parameters_get_float32_state_and_master_y():
    rng = np.random.RandomState(0)
    layer = paddle.nn.Linear(6, 5)
    layer.to(dtype="bfloat16")
    layer.weight.set_value(paddle.to_tensor(rng.standard_normal((6, 5)).astype("float32")).astype("bfloat16"))
    param = layer.weight
    target = paddle.to_tensor(rng.standard_normal((6, 5)).astype("float32"))
    opt = AdamWScheduleFree(0.05, [param], multi_precision=True)
    ref = NumpyScheduleFree(0.05)
    weights = {"p": param.astype("float32").numpy().astype(np.float64)}
    for step in range(4):
        ((param.astype("float32") - target) ** 2).sum().backward()
        grad = param.grad.astype("float32").numpy()
        opt.step()
        opt.clear_grad()
        ref.step(weights, {"p": grad})
    state = opt.state_dict()
    assert param.dtype == paddle.bfloat16
    assert state[f"{param.name}_schedulefree_z"].dtype == paddle.float32
    master = state["master_weights"][param.name]
    np.testing.assert_allclose(master.numpy(), ref.state["p"]["y"], rtol=1e-5, atol=1e-5)
    opt.eval()
    np.testing.assert_allclose(param.astype("float32").numpy(), ref.state["p"]["x"], rtol=1e-2, atol=1e-2)
    opt.train()
    assert np.array_equal(param.astype("float32").numpy(), master.astype("bfloat16").astype("float32").numpy())


def test_step_is_skipped_when_the_grad_scaler_found_inf():
    net = make_net()
    opt = AdamWScheduleFree(0.01, net.parameters())
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    backward(net, 0)
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(True))
    opt.step()
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in net.state_dict().items())
    assert opt._state == {} and opt._k == 0 and opt._weight_sum == 0.0
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(False))
    opt.step()
    assert opt._k == 1 and not np.array_equal(net.linear.weight.numpy(), before["linear.weight"])


# (6) the arguments ------------------------------------------------------------------------------------------

REQUIRED = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "photos",
            "--instance_prompt", "a photo of sks dog"]


def test_optim_flag_parses_and_refuses_decaying_schedules(tmp_path):
    from ppdreambooth.config.parsing import parse_args
    from ppdreambooth.errors import ConfigError

    required = REQUIRED + ["--output_dir", str(tmp_path / "out")]
    args = parse_args(required + ["--optim", "adamw_schedulefree"])[2]
    assert args.optim == "adamw_schedulefree" and str(getattr(args.lr_scheduler_type, "value", "")) == "constant"
    args = parse_args(required + ["--optim", "adamw_schedulefree", "--lr_scheduler", "constant_with_warmup",
                                  "--lr_warmup_steps", "3"])[2]
    assert args.optim == "adamw_schedulefree" and args.lr_scheduler_type.value == "constant_with_warmup"
    for flag in ("--lr_scheduler", "--lr_scheduler_type"):
        with pytest.raises(ConfigError, match=r"--lr_scheduler cosine .*--optim adamw_schedulefree"):
            parse_args(required + ["--optim", "adamw_schedulefree", flag, "cosine"])
    with pytest.raises(ConfigError, match="--use_ema"):
        parse_args(required + ["--optim", "adamw_schedulefree", "--use_ema"])
    with pytest.raises(ConfigError, match="does not run with --sharding"):
        parse_args(required + ["--optim", "adamw_schedulefree", "--sharding", "stage1"])
    with pytest.raises(ConfigError, match="--adam_beta1 0"):
        parse_args(required + ["--optim", "adamw_schedulefree", "--adam_beta1", "0"])


def test_paddlenlp_trainer_builds_it_with_its_own_warmup_and_saves_x(tmp_path):
    """The real Trainer with DreamBoothTrainer's create_scheduler/create_optimizer/log: a constant schedule, the
    warmup of constant_with_warmup inside the optimizer, the ScheduleFreeWeights seam attached, the logged rate."""
    from paddlenlp.trainer import Trainer, TrainerCallback

    from ppdreambooth.config.arguments import DreamBoothTrainingArguments
    from ppdreambooth.modeling.schedulefree import ScheduleFreeWeights
    from ppdreambooth.training.trainer import DreamBoothTrainer

    class SFTrainer(DreamBoothTrainer):  # all of it but the parts that need a diffusion model
        compute_loss = Trainer.compute_loss
        _save = Trainer._save
        _get_train_sampler = Trainer._get_train_sampler

    class Regression(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.b = paddle.nn.Linear(4, 8), paddle.nn.Linear(8, 1)

        def forward(self, x, y):
            return (((self.b(paddle.tanh(self.a(x))) - y) ** 2).mean(),)

    class Logs(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    rng = np.random.RandomState(0)
    data = [{"x": rng.standard_normal(4).astype("float32"), "y": rng.standard_normal(1).astype("float32")}
            for _ in range(24)]
    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        model = Regression()
    args = DreamBoothTrainingArguments(
        output_dir=str(tmp_path), optim="adamw_schedulefree", learning_rate=0.01, max_steps=5, save_steps=10,
        logging_steps=1, per_device_train_batch_size=4, lr_scheduler_type="constant_with_warmup", warmup_steps=3,
        weight_decay=0.1, max_grad_norm=1.0, seed=0, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    logs, weights = Logs(), ScheduleFreeWeights()
    trainer = SFTrainer(model=model, args=args, train_dataset=data, callbacks=[logs], base_model="-",
                        schedule_free=weights)
    trainer.train()
    opt = trainer.optimizer
    assert type(opt) is AdamWScheduleFree and weights.optimizer is opt and opt.training
    assert opt._warmup_steps == 3 and opt._weight_decay == 0.1 and opt._k == 5
    assert [trainer.lr_scheduler.get_lr()] == [0.01]  # constant: the warmup is the optimizer's
    rates = [entry["schedulefree_lr"] for entry in logs.logs if "loss" in entry]
    assert rates == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01])
    y = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with weights.swapped_in():
        x = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    assert all(np.array_equal(v.numpy(), y[k]) for k, v in model.state_dict().items())
    assert not any(np.array_equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("extra, message", [
    (["--lr_scheduler", "linear"], "--lr_scheduler linear"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler polynomial"),
    (["--use_ema"], "--use_ema"),
], ids=["linear", "polynomial", "ema"])
def test_bad_combinations_stop_the_run_before_loading(extra, message, tiny_model, photos, tmp_path, capsys,
                                                      no_model_loading):
    from ppdreambooth import train

    argv = train_argv(tiny_model, photos, tmp_path / "out", extra=["--optim", "adamw_schedulefree", *extra])
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "adamw_schedulefree" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


# (7) end to end ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_saves_x_and_resumes_exactly(tiny_model, photos, tmp_path):
    """The saved UNet is schedule-free's x (not the y the parameters held), computed from the last checkpoint's
    y and z; resuming from a checkpoint gives the uninterrupted run's final weights bit for bit."""
    from helpers.models import load_unet_weights

    extra = ["--optim", "adamw_schedulefree", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
             "--checkpointing_steps", "2", "--train_text_encoder", "--text_encoder_learning_rate", "5e-4",
             "--validation_prompt", "a photo of sks dog", "--validation_steps", "2", "--num_validation_images", "1",
             "--validation_inference_steps", "2"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=4, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_unet_weights(str(full))
    assert os.path.isfile(full / "validation" / "step-2" / "image-0.png")  # sampled from x in between

    # The last checkpoint holds y (model_state) and z (optimizer.pdopt): x = (y - (1 - beta1) z) / beta1. Both
    # files list the trained parameters in the same order (the model's; the optimizer meets them in that order).
    y = paddle.load(str(full / "checkpoint-4" / "model_state.pdparams"), return_numpy=True)
    opt_state = paddle.load(str(full / "checkpoint-4" / "optimizer.pdopt"), return_numpy=True)
    assert int(opt_state["schedulefree_k"]) == 4
    z_keys = [k for k in opt_state if k.endswith("_schedulefree_z")]
    assert len(z_keys) == len(y) and any(k.startswith("text_encoder.") for k in y)  # the text encoder is trained
    unet_keys = [k for k in y if k.startswith("unet.")]
    differs = 0
    for key, z_key in zip(y, z_keys):
        z = opt_state[z_key]
        assert z.shape == y[key].shape, (key, z_key)
        if key not in unet_keys:
            continue
        x = (y[key].astype(np.float64) - 0.1 * z.astype(np.float64)) / 0.9
        stored = saved[key[len("unet."):]]
        np.testing.assert_allclose(stored, x, rtol=1e-5, atol=1e-6 * max(np.abs(x).max(), 1e-30), err_msg=key)
        differs += not np.array_equal(stored, y[key])
    assert differs > len(unet_keys) // 2  # the saved weights are not y
    assert "schedulefree_lr" in result.stdout + result.stderr + _log_text(full)

    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_model, photos, resumed, steps=4, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global step 2" in result.stderr + result.stdout
    weights = load_unet_weights(str(resumed))
    assert weights.keys() == saved.keys() and all(np.array_equal(weights[k], saved[k]) for k in weights)

    # From the last checkpoint nothing is left to train: the final model is still x, from the loaded state.
    finished = tmp_path / "finished"
    truncate_run_to(str(full), 4, str(finished))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_model, photos, finished, steps=4, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_unet_weights(str(finished))
    assert all(np.array_equal(weights[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_lora_training_saves_x_adapters_and_resumes_exactly(tiny_model, photos, tmp_path):
    from safetensors.numpy import load_file

    from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME

    extra = ["--optim", "adamw_schedulefree", "--use_lora", "--lora_rank", "4", "--checkpointing_steps", "2",
             "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"]
    full = tmp_path / "full"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, full, steps=4, extra=extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(str(full / LORA_WEIGHTS_NAME))
    y = paddle.load(str(full / "checkpoint-4" / "model_state.pdparams"), return_numpy=True)
    opt_state = paddle.load(str(full / "checkpoint-4" / "optimizer.pdopt"), return_numpy=True)
    z_keys = [k for k in opt_state if k.endswith("_schedulefree_z")]
    assert len(z_keys) == len(y)
    xs = [(y[key].astype(np.float64) - 0.1 * opt_state[z_key].astype(np.float64)) / 0.9
          for key, z_key in zip(y, z_keys)]
    ys = list(y.values())
    matched = 0
    for name, value in saved.items():  # every saved adapter tensor is some trained parameter's x, none its y
        assert not any(v.shape == value.shape and np.array_equal(v, value) for v in ys if v.any()), name
        matched += any(x.shape == value.shape and np.allclose(value, x, rtol=1e-5, atol=1e-7) for x in xs)
    assert matched == len(saved) == len(y), (matched, len(saved), len(y))

    resumed = tmp_path / "resumed"
    truncate_run_to(str(full), 2, str(resumed))
    result = run_module(["-m", "ppdreambooth.train", *train_argv(
        tiny_model, photos, resumed, steps=4, extra=extra + ["--resume_from_checkpoint", "latest"])])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(str(resumed / LORA_WEIGHTS_NAME))
    assert weights.keys() == saved.keys() and all(np.array_equal(weights[k], saved[k]) for k in saved)


def _log_text(run_dir):
    path = os.path.join(run_dir, "train.log")
    return open(path).read() if os.path.isfile(path) else ""
