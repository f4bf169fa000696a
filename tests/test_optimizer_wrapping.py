"""The DP step wraps any optimizer instance: learning-rate schedulers in either order, and fresh loaders."""

import warnings

import pytest
import torch

import groupclip


def _engine(model, opt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=1.0, seed=0, **kw)


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_lr_scheduler_in_either_order(scheduler_first):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if scheduler_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        engine = _engine(model, opt)
    else:
        engine = _engine(model, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        before = model.weight.detach().clone()
        opt.step()
        sched.step()
        assert not torch.equal(before, model.weight)
    assert engine.steps == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    engine.detach()
    assert "zero_grad" not in opt.__dict__


def test_second_engine_on_same_optimizer_is_refused():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = _engine(model, opt)
    with pytest.raises(Exception, match="already"):
        _engine(model, opt)
    engine.detach()


def test_each_data_loader_call_continues_the_sampling_stream():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = _engine(model, opt)
    data = torch.utils.data.TensorDataset(torch.arange(40.0)[:, None].expand(40, 3).contiguous())
    epochs = []
    for _ in range(2):
        batches = []
        for (x,) in engine.data_loader(data):
            batches.append(x[:, 0].tolist())
            opt.zero_grad()
            opt.step()
        epochs.append(batches)
    assert epochs[0] != epochs[1], "a new loader must not repeat the previous loader's batches"
