"""GPTQ and round-to-nearest (orionlm.quant.gptq), checked against a column-by-column reference written from
the paper, against RTN, and against exact invariants of the algorithm."""

import functools
import gzip
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.quant.gptq import Hessian, QuantConfig, QuantError, find_params, gptq, quantize, rtn
from orionlm.tokenizer import Tokenizer

FIELDS = ("qweight", "scale", "zero", "g_idx", "weight")


def _assert_same(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _inputs(tokens, features, seed=0, spread=False, dtype=torch.float64):
    """Correlated random activations (tokens, features); `spread` gives the features very different scales, which
    makes H ill-conditioned, as real activations (with their outlier features) do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=dtype) / features**0.5 + torch.eye(features, dtype=dtype)
    x = torch.randn(tokens, features, generator=g, dtype=dtype) @ mix
    return x * torch.rand(features, generator=g, dtype=dtype) * 3 if spread else x


def _hessian(x):
    h = Hessian(x.shape[1], dtype=x.dtype)
    h.add(x)
    return h.matrix


def _output_error(weight, quantized, x):
    """||(W - Q) x||^2 averaged over the tokens."""
    return ((weight - quantized) @ x.T).square().sum().item() / len(x)


# --- config and quantizer ---


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(bits=True), "bits must be one of"),
        (dict(group_size=0), "group_size must be -1"),
        (dict(group_size=-2), "group_size must be -1"),
        (dict(group_size=32.0), "group_size must be -1"),
        (dict(damp_percent=1.0), r"damp_percent must be in \[0, 1\)"),
        (dict(damp_percent=-0.1), r"damp_percent must be in \[0, 1\)"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(sym="yes"), "sym must be true or false"),
        (dict(desc_act=1), "desc_act must be true or false"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(QuantError, match=message) as error:
        QuantConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_config_defaults_and_maxq():
    config = QuantConfig()
    assert (config.bits, config.group_size, config.sym, config.desc_act, config.static_groups) == (
        4,
        128,
        True,
        False,
        False,
    )
    assert (config.damp_percent, config.true_sequential, config.block_size) == (0.01, True, 128)
    assert [QuantConfig(bits=b).maxq for b in (2, 3, 4, 8)] == [3, 7, 15, 255]


def test_find_params_and_quantize_by_hand():
    """2 bits (codes 0..3), worked out on paper. Rounding is half to even, as torch.round (and AutoGPTQ) do."""
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    scale, zero = find_params(w, QuantConfig(bits=2, sym=False))
    # range [min(w, 0), max(w, 0)] over 3 steps; zero = round(-min / scale); all-zero row: range [-1, 1]
    assert torch.equal(scale, torch.tensor([1.0, 2 / 3, 2 / 3]))
    assert torch.equal(zero, torch.tensor([1.0, 0.0, 2.0]))  # round(1.5) = 2
    assert torch.equal(quantize(w, scale[:, None], zero[:, None], 3), torch.tensor([[0.0, 1, 3], [0, 2, 3], [2, 2, 2]]))
    # sym: range +-max|w| with the zero point at 2; row 2 has no negative weight, and its top still fits
    # (AutoGPTQ would use the range [0, 2], scale 2/3, and clip 1.0 and 2.0 to code 3 = 0.667)
    scale, zero = find_params(w, QuantConfig(bits=2, sym=True))
    assert torch.equal(scale, torch.tensor([4 / 3, 4 / 3, 2 / 3]))
    assert torch.equal(zero, torch.tensor([2.0, 2.0, 2.0]))
    q = quantize(w, scale[:, None], zero[:, None], 3)
    assert torch.equal(q, torch.tensor([[1.0, 2, 3], [2, 3, 3], [2, 2, 2]]))  # -0.75 -> -1 + 2; 1.5 -> 2 + 2, clamped
    assert torch.equal(
        scale[:, None] * (q - zero[:, None]), torch.tensor([[-4 / 3, 0, 4 / 3], [0, 4 / 3, 4 / 3], [0, 0, 0]])
    )


def test_rtn_groups_ragged_last_group():
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    result = rtn(w, QuantConfig(bits=3, group_size=16, sym=False))
    assert result.scale.shape == result.zero.shape == (8, 3)  # groups of 16, 16 and 8 columns
    assert torch.equal(result.g_idx, torch.arange(40, dtype=torch.int32) // 16)
    for g, columns in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        scale, zero = find_params(w[:, columns], QuantConfig(bits=3, sym=False))
        assert torch.equal(result.scale[:, g], scale) and torch.equal(result.zero[:, g], zero.int())
        assert torch.equal(result.qweight[:, columns], quantize(w[:, columns], scale[:, None], zero[:, None], 7).int())
    assert result.qweight.dtype == result.zero.dtype == result.g_idx.dtype == torch.int32
    assert result.loss is None


# --- the reference ---


def reference_gptq(weight, hessian, config, follow=None):
    """GPTQ as the paper's Algorithm 1 reads without its two speed-ups (Cholesky form, lazy batches), i.e. the
    OBS step of eqs. (2)-(3), in float64: one column at a time, its rounding error spread over the later columns
    by the current inverse Hessian, which then drops that column by Gaussian elimination. Dead columns, damping,
    act order and groups as the reference repository treats them (the module docstring of orionlm.quant.gptq
    says where orionlm deviates). Returns (codes, scale, zero, g_idx, dequantized, ties): where w / scale lies
    within 1e-9 of a rounding tie (x.5), the code is taken from `follow` (codes (out, in)) if given, provided it
    is one of the two candidates; `ties` lists the steps (positions in the quantization order) where a code so
    taken differs from this function's rounding."""
    W, H = weight.double().clone(), hessian.double().clone()
    rows, n = W.shape
    maxq = 2**config.bits - 1

    def params(w):
        low, high = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        if config.sym:
            high = torch.maximum(high, -low)
            low = -high
        flat = high == low
        low, high = low.masked_fill(flat, -1), high.masked_fill(flat, 1)
        scale = (high - low) / maxq
        return scale, torch.full_like(scale, 2 ** (config.bits - 1)) if config.sym else torch.round(-low / scale)

    dead = [j for j in range(n) if H[j, j] == 0]
    for j in dead:
        H[j, j] = 1
        W[:, j] = 0
    size = n if config.group_size == -1 else config.group_size
    n_groups = -(-n // size)
    static = config.static_groups or n_groups == 1
    scale, zero = torch.zeros(rows, n_groups, dtype=W.dtype), torch.zeros(rows, n_groups, dtype=W.dtype)
    if static:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = params(W[:, g * size : (g + 1) * size])
    diagonal = H.diagonal().tolist()
    order = sorted(range(n), key=lambda j: -diagonal[j]) if config.desc_act else list(range(n))
    W, H = W[:, order], H[order][:, order]
    H += config.damp_percent * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes, dequantized = torch.zeros_like(W), torch.zeros_like(W)
    g_idx = torch.zeros(n, dtype=torch.int32)
    ties = []
    for i in range(n):
        g = order[i] // size if static else i // size
        if not static and i % size == 0:
            scale[:, g], zero[:, g] = params(W[:, i : i + size])
        g_idx[order[i]] = g
        ratio = W[:, i] / scale[:, g]
        codes[:, i] = torch.clamp(torch.round(ratio) + zero[:, g], 0, maxq)
        if follow is not None:
            tie = (ratio.abs().frac() - 0.5).abs() < 1e-9
            other = follow[:, order[i]].double()
            candidate = (other == torch.clamp(ratio.floor() + zero[:, g], 0, maxq)) | (
                other == torch.clamp(ratio.ceil() + zero[:, g], 0, maxq)
            )
            taken = tie & candidate
            ties += [i] * int((taken & (other != codes[:, i])).sum())
            codes[:, i] = torch.where(taken, other, codes[:, i])
        dequantized[:, i] = scale[:, g] * (codes[:, i] - zero[:, g])
        error = (W[:, i] - dequantized[:, i]) / Hinv[i, i]
        W[:, i:] -= error[:, None] * Hinv[i, i:]
        Hinv[i:, i:] -= Hinv[i:, i, None] * Hinv[i, None, i:] / Hinv[i, i]
    inverse = torch.argsort(torch.tensor(order))
    return codes[:, inverse].int(), scale, zero.int(), g_idx, dequantized[:, inverse], ties


GROUPINGS = {"row": (-1, False), "32": (32, False), "24": (24, False), "32-static": (32, True), "24-static": (24, True)}


@functools.cache
def _reference_case():
    """100 input columns (so groups of 24 and 32 leave a ragged last group), two of them dead, ill-conditioned H."""
    x = _inputs(400, 100, seed=1, spread=True)
    x[:, [5, 40]] = 0
    weight = torch.randn(24, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return weight, _hessian(x)


@pytest.mark.parametrize("desc_act", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference(bits, sym, grouping, desc_act):
    """Blocked, Cholesky-based gptq (block sizes 5 and 32, so groups of 24 start inside blocks and blocks get cut)
    against the column-by-column reference, both in float64.

    Integers, zero points and g_idx agree exactly, and so do the scales of static groups and of whole rows
    (found on weights both sides hold bit for bit). Scales found on the fly come from weights that took many
    updates, summed in a different order on each side, so they agree to rounding (1e-12), not bit for bit. Those
    last bits can decide one kind of integer: with sym, a group whose largest magnitude sits in its first column
    quantizes that weight at exactly -maxq/2 (e.g. -7.5) in exact arithmetic, a rounding tie either side may
    break either way, and the rest of the row follows the choice. So the reference takes gptq's code at exact
    ties (it checks that the code is one of the two candidates) and must then agree on every other integer; the
    codes so taken that differ must all be such first columns."""
    group_size, static_groups = GROUPINGS[grouping]
    weight, hessian = _reference_case()
    for block_size in (5, 32):
        config = QuantConfig(bits=bits, sym=sym, group_size=group_size, desc_act=desc_act,
                             static_groups=static_groups, block_size=block_size)  # fmt: skip
        result = gptq(weight, hessian, config)
        codes, scale, zero, g_idx, dequantized, ties = reference_gptq(weight, hessian, config, follow=result.qweight)
        fresh_groups = group_size != -1 and not static_groups
        assert all(sym and fresh_groups and step % group_size == 0 for step in ties), ties
        assert torch.equal(result.qweight, codes)
        assert torch.equal(result.zero, zero)
        assert torch.equal(result.g_idx, g_idx)
        if group_size == -1 or static_groups:
            assert torch.equal(result.scale, scale)
        torch.testing.assert_close(result.scale, scale, rtol=1e-12, atol=0)
        torch.testing.assert_close(result.weight, dequantized, rtol=1e-12, atol=1e-14)


# --- exact invariants ---


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_hessian_is_rtn(bits, group_size, sym):
    """With H = I no column's error reaches another (the inverse's off-diagonal entries are exact zeros), so
    GPTQ rounds each weight to nearest: every output equals rtn's bit for bit."""
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, block_size=48)
    result = gptq(weight, torch.eye(128), config)
    _assert_same(result, rtn(weight, config))
    assert result.weight.dtype == torch.float32


@pytest.mark.parametrize("damp_percent", [0.0, 0.1])
@pytest.mark.parametrize("grouping", ["row", "24", "24-static"])
def test_loss_is_the_output_error(grouping, damp_percent):
    """Q = W - E U for the scaled errors E and U^T U = H^-1, so 1/2 tr((W - Q) H (W - Q)^T) = 1/2 ||E||^2: the
    returned loss is exactly the mean output error ||(W - Q) x||^2 of the calibration tokens (with damping, the
    same quadratic form under the damped H)."""
    group_size, static_groups = GROUPINGS[grouping]
    x = _inputs(300, 64, seed=3)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hessian = _hessian(x)
    config = QuantConfig(group_size=group_size, static_groups=static_groups, desc_act=True, damp_percent=damp_percent)
    result = gptq(weight, hessian, config)
    damped = hessian + damp_percent * hessian.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    delta = weight - result.weight
    assert result.loss == pytest.approx(0.5 * torch.trace(delta @ damped @ delta.T).item(), rel=1e-10)
    if damp_percent == 0:
        assert result.loss == pytest.approx(_output_error(weight, result.weight, x), rel=1e-10)


@pytest.mark.parametrize("static_groups", [False, True], ids=["groups-on-the-fly", "static-groups"])
def test_act_order_g_idx_and_dequantization(static_groups):
    """Act order quantizes the columns by descending diag(H). Groups found on the fly are runs of that order, so
    g_idx[j] is the position of column j in it // group_size; static groups stay the original i // group_size
    (their parameters come from the original weights). Either way scale[:, g_idx] * (q - zero[:, g_idx])
    rebuilds the returned weight bit for bit, so the integers are stored under the parameters that made them."""
    x = _inputs(500, 96, seed=5, spread=True)
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    hessian = _hessian(x).float()
    config = QuantConfig(group_size=32, desc_act=True, static_groups=static_groups, sym=False)
    result = gptq(weight, hessian, config)

    order = torch.argsort(hessian.diagonal(), descending=True)
    assert not torch.equal(order, torch.arange(96))
    expected = torch.empty(96, dtype=torch.int32)
    expected[order] = torch.arange(96, dtype=torch.int32) // 32
    if static_groups:
        expected = torch.arange(96, dtype=torch.int32) // 32
        for g in range(3):
            scale, zero = find_params(weight[:, 32 * g : 32 * (g + 1)], config)
            assert torch.equal(result.scale[:, g], scale) and torch.equal(result.zero[:, g], zero.int())
    assert torch.equal(result.g_idx, expected)
    g_idx = result.g_idx.long()
    rebuilt = result.scale[:, g_idx] * (result.qweight - result.zero[:, g_idx])
    assert torch.equal(rebuilt, result.weight)
    assert result.qweight.min() >= 0 and result.qweight.max() <= 15


def test_act_order_breaks_ties_by_column():
    """Equal Hessian diagonals keep their column order (groups of 300 cut through each run of equal values), so
    g_idx does not depend on the sort's whims."""
    diagonal = torch.tensor([1.0, 3.0, 2.0]).repeat(400)
    weight = torch.randn(4, 1200, generator=torch.Generator().manual_seed(17))
    result = gptq(weight, torch.diag(diagonal), QuantConfig(group_size=300, desc_act=True))
    order = sorted(range(1200), key=lambda j: -diagonal[j].item())  # Python's sort is stable
    expected = torch.empty(1200, dtype=torch.int32)
    expected[order] = torch.arange(1200, dtype=torch.int32) // 300
    assert torch.equal(result.g_idx, expected)


def test_dead_columns():
    """Columns whose input was always 0 are zeroed before anything else: their weights (here huge) neither
    widen any group's range nor leave anything but an exact 0 behind."""
    x = _inputs(300, 64, seed=7)
    x[:, [3, 50]] = 0
    hessian = _hessian(x).float()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    zeroed = weight.clone()
    zeroed[:, [3, 50]] = 0
    weight[:, [3, 50]] = 100.0
    for group_size in (-1, 32):
        config = QuantConfig(group_size=group_size, desc_act=True, sym=False)
        result = gptq(weight, hessian, config)
        _assert_same(result, gptq(zeroed, hessian, config))
        assert torch.equal(result.weight[:, [3, 50]], torch.zeros(16, 2))
        assert result.scale.max() < 1


def test_damping():
    """H = all ones (rank 1, positive semidefinite) has no Cholesky factor; 1% of its mean diagonal on the
    diagonal makes it positive definite."""
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(9))
    with pytest.raises(QuantError, match=r"weight shape \(8, 16\) is not positive definite: raise damp_percent"):
        gptq(weight, torch.ones(16, 16), QuantConfig(damp_percent=0))
    result = gptq(weight, torch.ones(16, 16), QuantConfig(damp_percent=0.01))
    assert torch.isfinite(result.weight).all()


def test_bad_hessians_and_weights():
    weight = torch.randn(8, 16)
    with pytest.raises(QuantError, match="no calibration input reached it.*rtn"):
        gptq(weight, torch.zeros(16, 16), QuantConfig())
    with pytest.raises(QuantError, match=r"needs a Hessian of shape \(16, 16\), got \(8, 8\)"):
        gptq(weight, torch.eye(8), QuantConfig())
    with pytest.raises(QuantError, match="inf or nan"):
        gptq(weight, torch.full((16, 16), math.nan), QuantConfig())
    with pytest.raises(QuantError, match=r"must be \(out_features, in_features\)"):
        rtn(torch.randn(16), QuantConfig())


def test_hessian_running_average_and_hook():
    """H after uneven batches = 2/n X^T X over all n rows; attach() collects what a linear receives."""
    x = _inputs(70, 12, seed=10)
    h = Hessian(12, dtype=torch.float64)
    for rows in (slice(0, 5), slice(5, 5), slice(5, 45), slice(45, 70)):
        h.add(x[rows])
    assert h.count == 70
    torch.testing.assert_close(h.matrix, 2 / 70 * x.T @ x, rtol=1e-13, atol=0)

    linear = nn.Linear(12, 4).double()
    hooked = Hessian(12, dtype=torch.float64)
    handle = hooked.attach(linear)
    linear(x[:30].view(3, 10, 12))
    linear(x[30:].view(2, 20, 12))
    handle.remove()
    linear(x)
    assert hooked.count == 70
    torch.testing.assert_close(hooked.matrix, h.matrix, rtol=1e-13, atol=0)
    result = gptq(linear.weight, hooked.matrix, QuantConfig(group_size=-1))  # a parameter: nothing is traced
    assert not result.weight.requires_grad and linear.weight.grad_fn is None
    with pytest.raises(QuantError, match="inputs of 8 features for a Hessian of 12"):
        h.add(torch.randn(3, 8))


def test_low_precision_weights_solve_in_float32():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(11)).bfloat16()
    hessian = _hessian(_inputs(200, 64, seed=12)).float()
    result = gptq(weight, hessian, QuantConfig(group_size=32))
    assert result.weight.dtype == result.scale.dtype == torch.float32
    _assert_same(result, gptq(weight.float(), hessian, QuantConfig(group_size=32)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """float64 on both devices; asym, so no sym tie (test_matches_reference) can tip an integer."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    hessian = _hessian(_inputs(1000, 256, seed=14, spread=True))
    config = QuantConfig(group_size=64, desc_act=True, sym=False)
    cpu, cuda = gptq(weight, hessian, config), gptq(weight.cuda(), hessian.cuda(), config)
    assert torch.equal(cuda.qweight.cpu(), cpu.qweight) and torch.equal(cuda.g_idx.cpu(), cpu.g_idx)
    torch.testing.assert_close(cuda.scale.cpu(), cpu.scale, rtol=1e-12, atol=0)


# --- better than round-to-nearest ---

CONFIGS = list(itertools.product([4, 3], [-1, 32], [False, True]))
CONFIG_IDS = [f"{b}bit-g{g}-{'act' if a else 'inorder'}" for b, g, a in CONFIGS]


@pytest.mark.parametrize("bits, group_size, desc_act", CONFIGS, ids=CONFIG_IDS)
def test_beats_rtn_on_random_inputs(bits, group_size, desc_act):
    x = _inputs(2048, 128, seed=15, spread=True, dtype=torch.float32)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(16))
    config = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    result = gptq(weight, _hessian(x), config)
    assert _output_error(weight, result.weight, x) < 0.7 * _output_error(weight, rtn(weight, config).weight, x)


LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@functools.cache
def _activations(text_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A tiny random-init model's weights and the inputs its linears receive on Shakespeare (2048 byte tokens)."""
    tokenizer = Tokenizer.byte_level()
    with gzip.open(text_path, "rt") as f:
        ids = torch.tensor(tokenizer.encode(f.read(20_000))[:2048]).view(8, 256)
    model = OrionLM(preset("tiny-dense", vocab_size=tokenizer.vocab_size, max_seq_len=256)).eval()
    model.reset_parameters(seed=0)
    captured = {name: [] for name in LINEARS}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, args, _o, name=name: captured[name].append(args[0]))
        for name in LINEARS
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {
        name: (model.get_submodule(name).weight.detach(), torch.cat(captured[name]).flatten(0, 1)) for name in LINEARS
    }


@pytest.mark.parametrize("bits, group_size, desc_act", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("linear", LINEARS)
def test_beats_rtn_on_real_activations(shared_data, linear, bits, group_size, desc_act):
    """Calibrated on 1536 tokens, GPTQ's output error is far below RTN's on them and on 512 held-out tokens
    (measured: 0.12-0.27 of RTN's)."""
    weight, x = _activations(shared_data / "pretrain" / "tinyshakespeare.txt.gz")[linear]
    calibration, held_out = x[:1536], x[1536:]
    h = Hessian(x.shape[1])
    h.add(calibration)
    config = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    quantized, rounded = gptq(weight, h.matrix, config).weight, rtn(weight, config).weight
    for tokens in (calibration, held_out):
        assert _output_error(weight, quantized, tokens) < 0.4 * _output_error(weight, rounded, tokens)
