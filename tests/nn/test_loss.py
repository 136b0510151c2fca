import pytest
import torch
import torch.nn.functional as F

from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.nn import loss as loss_module
from orionlm.nn.loss import linear_cross_entropy


def _unfused(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("chunk_elements", [1 << 22, 64 * 97])  # one chunk; many, the last one short
def test_value_and_gradients_equal_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(3, 100, 32, requires_grad=True)
    weight = (torch.randn(97, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 97, (3, 100))
    targets[0, :7] = -100  # ignored positions count neither in the sum nor in the mean
    expected = _unfused(hidden, weight, targets)
    grads_expected = torch.autograd.grad(2.5 * expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(2.5 * got, (hidden, weight))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-5)
    assert grads[0][0, :7].abs().max() == 0


def test_frozen_weight_and_no_grad():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    targets = torch.randint(0, 40, (50,))
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), hidden)
    (expected,) = torch.autograd.grad(_unfused(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), _unfused(hidden, weight, targets))


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_model_loss_from_targets_equals_loss_of_logits(name):
    torch.manual_seed(0)
    model = OrionLM(preset(name)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model(inputs, targets=targets)
    assert out.logits is None
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten())
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
