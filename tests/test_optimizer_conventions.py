"""The conventions of timm's and torch.optim's own optimizer tests, written here for LARS, LAMB and PMD-LAMB: a
closure with LR schedulers (ReduceLROnPlateau included) and param-group LRs lowers a loss, a state dict continues
a run identically and is deterministic, repeated groups pack alike, pickle / deepcopy, step hooks, zero gradients,
a tensor LR equals the float one, mixed dtypes."""
import copy
import functools
import pickle

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ExponentialLR, ReduceLROnPlateau, StepLR

from largebatch.optim import LAMB, LARS, PMDLAMB


def _basic(constructor, scheduler_constructors=()):
    torch.manual_seed(0)
    weight, bias, inp = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    optimizer = constructor(weight, bias)
    schedulers = [s(optimizer) for s in scheduler_constructors]
    repr(optimizer)
    def fn():
        optimizer.zero_grad()
        y = weight.mv(inp)
        loss = (y + bias).pow(2).sum()
        loss.backward()
        return loss
    initial = fn().item()
    for _ in range(200):
        for s in schedulers:
            if isinstance(s, ReduceLROnPlateau):
                s.step(fn().item())
            else:
                s.step()
        optimizer.step(fn)
    assert fn().item() < initial

def _state_dict(constructor):
    torch.manual_seed(0)
    weight, bias, inp = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)

    def fn_base(opt, w, b):
        opt.zero_grad()
        loss = (w.mv(inp) + b).pow(2).sum()
        loss.backward()
        return loss
    optimizer = constructor(weight, bias)
    fn = functools.partial(fn_base, optimizer, weight, bias)
    for _ in range(20):
        optimizer.step(fn)
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    optimizer_c = constructor(weight_c, bias_c)
    fn_c = functools.partial(fn_base, optimizer_c, weight_c, bias_c)
    state_dict_c = copy.deepcopy(optimizer.state_dict())
    optimizer_c.load_state_dict(state_dict_c)
    for _ in range(20):
        optimizer.step(fn)
        optimizer_c.step(fn_c)
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)
    torch.testing.assert_close(optimizer.state_dict(), optimizer_c.state_dict())  # deterministic
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    torch.testing.assert_close(optimizer.state_dict()["param_groups"][-1], optimizer_c.state_dict()["param_groups"][-1])
    for clone in (pickle.loads(pickle.dumps(optimizer)), copy.deepcopy(optimizer)):
        torch.testing.assert_close(clone.state_dict()["state"], optimizer.state_dict()["state"])

CTORS = {
    "lars": lambda ps, **kw: LARS(ps, **{"lr": 1e-3, **kw}),
    "lamb": lambda ps, **kw: LAMB(ps, **{"lr": 1e-3, **kw}),
    "pmdlamb": lambda ps, **kw: PMDLAMB(ps, **{"lr": 1e-3, "scale": 1.0, **kw}),  # scale 1: moves at lr 1e-3
}

@pytest.mark.parametrize("name", list(CTORS))
def test_basic(name):
    c = CTORS[name]
    _basic(lambda w, b: c([w, b]))
    _basic(lambda w, b: c([{"params": [w]}, {"params": [b], "lr": 3e-3}]))
    _basic(lambda w, b: c([w, b]), [lambda o: StepLR(o, gamma=0.9, step_size=10)])
    _basic(lambda w, b: c([w, b]), [lambda o: ExponentialLR(o, gamma=0.99)])
    _basic(lambda w, b: c([w, b]), [lambda o: ReduceLROnPlateau(o)])
    _basic(lambda w, b: c([w, b], lr=torch.tensor(1e-3)))
    _basic(lambda w, b: c([w, b], weight_decay=0.1))

@pytest.mark.parametrize("name", list(CTORS))
def test_state_dict(name):
    _state_dict(lambda w, b: CTORS[name]([w, b], weight_decay=1e-2))

@pytest.mark.parametrize("name", list(CTORS))
def test_model(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = CTORS[name](model.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

@pytest.mark.parametrize("name", list(CTORS))
def test_hooks_and_noop(name):
    w = Parameter(torch.randn(3, 2))
    opt = CTORS[name]([w], weight_decay=0.0)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step()  # no grads: nothing moves
    assert calls == ["pre", "post"]
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w, w0)  # zero gradients, no weight decay: no change
    opt.zero_grad()
    assert w.grad is None

@pytest.mark.parametrize("name", list(CTORS))
def test_nontensor_and_tensor_lr_equal(name):
    out = []
    for lr in (1e-2, torch.tensor(1e-2)):
        torch.manual_seed(0)
        w = Parameter(torch.randn(4, 3))
        opt = CTORS[name]([w], lr=lr)
        for _ in range(5):
            w.grad = torch.randn(4, 3)
            opt.step()
        out.append(w.detach().clone())
    torch.testing.assert_close(out[0], out[1])

@pytest.mark.parametrize("name", list(CTORS))
def test_mixed_dtype_and_float64(name):
    ws = [Parameter(torch.randn(4, 3, dtype=torch.float64)), Parameter(torch.randn(3)),
          Parameter(torch.randn(5).bfloat16())]
    opt = CTORS[name](ws, weight_decay=0.01)
    for _ in range(3):
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
    assert all(torch.isfinite(w).all() for w in ws)


def _named_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def _train(model, optimizer, steps=4):
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(CTORS))
def test_named_parameters_step_as_the_plain_ones_and_round_trip(name):
    """model.named_parameters() and named groups, as torch.optim takes them: the names land in the groups'
    "param_names", the steps are those of the unnamed optimizer, and a state dict moves between named and unnamed
    optimizers both ways (torch's rule: the names do not decide the loading) and continues identically."""
    plain, named, grouped = _named_model(), _named_model(), _named_model()
    opt_plain = CTORS[name](plain.parameters(), weight_decay=1e-2)
    opt_named = CTORS[name](named.named_parameters(), weight_decay=1e-2)
    params = list(grouped.named_parameters())
    opt_grouped = CTORS[name]([{"params": params[:2]}, {"params": params[2:]}], weight_decay=1e-2)
    assert opt_named.param_groups[0]["param_names"] == [n for n, _ in named.named_parameters()]
    assert opt_grouped.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    for model, opt in ((plain, opt_plain), (named, opt_named), (grouped, opt_grouped)):
        _train(model, opt)
    for a, b, c in zip(plain.parameters(), named.parameters(), grouped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    saved_named, saved_plain = copy.deepcopy(opt_named.state_dict()), copy.deepcopy(opt_plain.state_dict())
    assert saved_named["param_groups"][0]["param_names"][0] == "0.weight"
    for source, saved in ((named, saved_named), (plain, saved_plain)):
        for target_named in (True, False):
            model = copy.deepcopy(source)
            opt = CTORS[name](model.named_parameters() if target_named else model.parameters(), weight_decay=1e-2)
            opt.load_state_dict(copy.deepcopy(saved))
            _train(model, opt)
            reference = copy.deepcopy(plain)
            ref_opt = CTORS[name](reference.parameters(), weight_decay=1e-2)
            ref_opt.load_state_dict(copy.deepcopy(saved_plain))
            _train(reference, ref_opt)
            for a, b in zip(reference.parameters(), model.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt_named.add_param_group({"params": [("extra", Parameter(torch.randn(3)))]})
    assert opt_named.param_groups[-1]["param_names"] == ["extra"]
    with pytest.raises(ValueError, match="names"):  # torch.optim's rule: all with names, or none
        CTORS[name]([("a", Parameter(torch.randn(2))), Parameter(torch.randn(2))])


@pytest.mark.parametrize("name", ["lamb", "pmdlamb"])
def test_named_complex_parameters_are_refused_by_name(name):
    with pytest.raises(ValueError, match=r"does not support complex parameters \(shapes \[\(2,\)\]\)"):
        CTORS[name]([("w", Parameter(torch.randn(2, dtype=torch.complex64)))])
