"""The fused batch norm -> ReLU -> field dropout [-> 2 x 2 max pool] (:mod:`kit.kernels.bn_relu`) against the module
chain it replaces (``BatchNorm3d``, ``ReLU``, ``dropout3d``, ``max_pool2d``; the reference stays the modules):

* the operator equals the chain in float64 to 1e-12 (output, the gradients of the input, weight and bias), with
  and without dropout (the same random draws), with the running statistics and batch counter updated alike;
  float32 within round-off; gradcheck; pooled: the same, ties routed as ``max_pool2d`` routes them;
* a model's training step takes the fused path exactly where it applies (training, eager, CPU, no hooks) and
  is then the same float64 step as under ``reference_kernels()``; hooks (precision traces) and eval mode see
  the modules.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.kernels import bn_relu as BR
from fused_helpers import built_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fused():
    return built_or_skip(BR.bn_relu_extension(), "batch norm -> ReLU")


def _bn(C, dtype, momentum=0.1):
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)                       # negative scales too: the mask flips
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("p,momentum,shape", [(0.0, 0.1, (4, 5, 3, 7, 6)), (0.3, 0.1, (3, 4, 16, 5, 5)),
                                              (0.5, None, (2, 3, 1, 1, 17))])
def test_fused_equals_the_module_chain_in_float64(fused, p, momentum, shape):
    bn = _bn(shape[1], torch.float64, momentum)
    bn0 = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(1)
    for step in range(2):                                   # twice: running statistics and counter accumulate
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_()
        torch.manual_seed(10 + step)
        y = BR.batch_norm_relu(x, bn, dropout_p=p)
        torch.manual_seed(10 + step)
        y0 = F.dropout3d(F.relu(bn0(x)), p, True)
        gy = torch.randn(shape, generator=g, dtype=torch.float64)
        gr = torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)
        gr0 = torch.autograd.grad(y0, (x, bn0.weight, bn0.bias), gy)
        for a, b in ((y, y0), *zip(gr, gr0), (bn.running_mean, bn0.running_mean), (bn.running_var, bn0.running_var)):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max(), (p, step)
        assert int(bn.num_batches_tracked) == int(bn0.num_batches_tracked) == step + 1
        if p:
            assert (y == 0).any() and ((y0 == 0) == (y == 0)).all()     # the same fields dropped


def _chain(x, bn, p, pool):
    y = F.dropout3d(F.relu(bn(x)), p, True)
    return F.max_pool2d(y.flatten(1, 2), 2).view(*y.shape[:3], y.shape[3] // 2, y.shape[4] // 2) if pool else y


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_fused_pooled_equals_the_module_chain_in_float64(fused, p):
    bn = _bn(4, torch.float64)
    bn0 = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, 5, 8, 6, generator=g, dtype=torch.float64) * 2 + 1)
    x[0, 0, 0, :2, :2] = 7.0                                # ties inside a window: the first maximum gets the gradient
    x[1, 1, 1, 2:4, 2:4] = -9.0                             # a window that the ReLU zeroes for either sign of w
    x.requires_grad_()
    torch.manual_seed(4)
    y = BR.batch_norm_relu(x, bn, dropout_p=p, pool=True)
    torch.manual_seed(4)
    y0 = _chain(x, bn0, p, True)
    assert y.shape == (3, 4, 5, 4, 3)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gr = torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)
    gr0 = torch.autograd.grad(y0, (x, bn0.weight, bn0.bias), gy)
    for a, b in ((y, y0), *zip(gr, gr0), (bn.running_mean, bn0.running_mean), (bn.running_var, bn0.running_var)):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), p
    with pytest.raises(ValueError, match="H and W even"):
        BR.batch_norm_relu(x[..., :5], bn, pool=True)


def test_fused_float32_is_within_round_off(fused):
    bn = _bn(6, torch.float32)
    bn0 = copy.deepcopy(bn)
    x = (torch.randn(8, 6, 16, 9, 9) * 4 + 10).requires_grad_()   # a large mean: the variance must not cancel
    y = BR.batch_norm_relu(x, bn)
    y0 = F.relu(bn0(x))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, bn.weight, bn.bias), gy),
                    torch.autograd.grad(y0, (x, bn0.weight, bn0.bias), gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("pool", [False, True])
def test_fused_gradcheck(fused, pool):
    bn = _bn(3, torch.float64)
    x = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b = bn.weight, bn.bias
    s = torch.tensor([[2.0, 0.0, 2.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    f = lambda x, w, b: BR._BatchNormReLU.apply(x if pool else x.view(2, 3, -1), w, b, s, 1e-5, pool)[0]
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_bad_input_is_named(fused):
    with pytest.raises(ValueError, match=r"x \(B, 4, \.\.\.\)"):
        BR.batch_norm_relu(torch.zeros(2, 3, 5), nn.BatchNorm1d(4))


def test_model_step_takes_the_fused_path_only_where_it_applies(fused, monkeypatch):
    from kit.kernels import reference_kernels
    from kit.models import create
    torch.manual_seed(0)
    net = create("nepdo-mnist-regular-fd-small").double().train()
    ref = copy.deepcopy(net)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    calls = []
    real = BR.batch_norm_relu
    monkeypatch.setattr(BR, "batch_norm_relu",
                        lambda *a, **k: calls.append((k.get("dropout_p"), k.get("pool"))) or real(*a, **k))
    torch.manual_seed(3)
    y = net(x)
    n_bn = sum(type(m).__name__ == "GroupBatchNorm" for m in net.modules())
    assert len(calls) == n_bn                                            # every field BN, with what follows it:
    assert sorted(set(calls)) == [(0.0, False), (0.0, True), (0.1, False), (0.1, True)]   # dropout, 2x2 max pool
    y.square().sum().backward()
    with reference_kernels():
        torch.manual_seed(3)
        y0 = ref(x)
        y0.square().sum().backward()
    assert len(calls) == n_bn                                            # the reference runs the modules
    assert (y - y0).abs().max() <= 1e-12 * y0.abs().max()
    ga = torch.cat([p.grad.flatten() for p in net.parameters()])         # every gradient of the network (some are
    gb = torch.cat([p.grad.flatten() for p in ref.parameters()])         # zero in exact arithmetic: biases before BN)
    assert (ga - gb).abs().max() <= 1e-11 * gb.abs().max()               # float64 sums of 1e5 terms in other orders
    for a, b in zip(net.buffers(), ref.buffers()):                      # running statistics (means near 0: the
        assert (a - b).abs().max() <= 1e-11 * b.abs().max() if a.is_floating_point() else torch.equal(a, b)  # scale)
    net.eval()
    net(x)
    assert len(calls) == n_bn                                            # eval: the modules
    net.train()
    bn = next(m for m in net.modules() if type(m).__name__ == "GroupBatchNorm")
    h = bn.register_forward_hook(lambda *a: None)
    net(x)
    assert len(calls) == 2 * n_bn - 1                                    # the hooked norm runs as a module
    h.remove()
