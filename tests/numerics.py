"""Tolerances measured from float32 rounding error instead of fixed numbers."""

import copy

import torch


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a model: its outputs are the exact values that the float32 model approximates."""
    return copy.deepcopy(model).double()


def assert_within_float32_noise(got: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor) -> None:
    """got and expected are two float32 computations of the same values (cached decoding and a full pass,
    say); exact is the float64 computation. Other kernels, reduction orders or thread counts move got about
    as far from the exact values as expected already is, so the bound is measured rather than fixed: four
    times expected's own rounding error, one rule for every family, machine and library version. A real
    difference (a wrong position, bias or cache entry) is orders of magnitude larger."""
    noise = (expected.double() - exact.double()).abs().max().item()
    assert noise > 0, "the float64 reference equals the float32 values, so it measures no rounding error"
    torch.testing.assert_close(got.double(), expected.double(), atol=4 * noise, rtol=0)
