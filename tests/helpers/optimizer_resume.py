"""The resume check every hand-written optimizer's tests share: train straight through, and train with a save and a
resume in a fresh network and optimizer in between, as PaddleNLP's Trainer does; the two must agree bit for bit."""
import numpy as np
import paddle


def resume_matches_uninterrupted(tmp_path, make_net, new_optimizer, train, split, total):
    """`new_optimizer(net)` -> (optimizer, scheduler or None); `train(net, optimizer, scheduler, steps)`.

    Saves model, `optimizer.pdopt` and the scheduler after `split` steps, continues to `total`, then builds a net
    (another seed) and optimizer afresh, loads the files and trains the same steps. Asserts equal weights and
    equal optimizer state tensors; returns (continued optimizer state as NumPy, continued (net, optimizer),
    resumed (net, optimizer))."""
    net = make_net()
    opt, scheduler = new_optimizer(net)
    train(net, opt, scheduler, range(split))
    paddle.save(net.state_dict(), str(tmp_path / "model.pdparams"))
    paddle.save(opt.state_dict(), str(tmp_path / "optimizer.pdopt"))
    if scheduler is not None:
        paddle.save(scheduler.state_dict(), str(tmp_path / "scheduler.pdparams"))
    train(net, opt, scheduler, range(split, total))
    continued = {k: v.numpy() for k, v in net.state_dict().items()}
    continued_state = {k: v.numpy() for k, v in opt.state_dict().items() if isinstance(v, paddle.Tensor)}

    resumed_net = make_net(seed=1)
    resumed_opt, resumed_scheduler = new_optimizer(resumed_net)
    resumed_net.set_state_dict(paddle.load(str(tmp_path / "model.pdparams")))
    resumed_opt.set_state_dict(paddle.load(str(tmp_path / "optimizer.pdopt")))
    if resumed_scheduler is not None:
        resumed_scheduler.set_state_dict(paddle.load(str(tmp_path / "scheduler.pdparams")))
    train(resumed_net, resumed_opt, resumed_scheduler, range(split, total))

    for name, value in resumed_net.state_dict().items():
        assert np.array_equal(value.numpy(), continued[name]), name
    resumed_state = {k: v.numpy() for k, v in resumed_opt.state_dict().items() if isinstance(v, paddle.Tensor)}
    assert sorted(resumed_state) == sorted(continued_state)
    for key, value in resumed_state.items():
        assert np.array_equal(value, continued_state[key]), key
    return continued_state, (net, opt), (resumed_net, resumed_opt)
