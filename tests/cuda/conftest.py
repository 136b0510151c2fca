"""The CUDA tests (marker `cuda`): the GPU side of every family, kernel and serving path, checked against the
CPU float32 results. Without a CUDA device they are skipped; scripts/gpu_check.sh runs them where one is lent.

ORIONLM_TEST_DEVICE=cpu runs them on the CPU instead (bf16 autocast is CPU autocast there, fla's kernels
skip): a check of the tests' own code on a machine without a GPU, before the few minutes a GPU is lent."""

import os

import pytest
import torch

DEVICE = os.environ.get("ORIONLM_TEST_DEVICE", "cuda")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEVICE != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture
def float32_cuda():
    """Float32 on CUDA computed in float32: cuDNN's convolutions (GDN's short convolution) default to TF32,
    10 bits of mantissa, which would make the CPU comparisons of float32 models about TF32's rounding."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 on the CPU: one number for a whole tensor, which bf16
    rounding moves by a few 2^-8 at most while a wrong path moves it by ~1."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


@pytest.fixture
def relative_error():
    return rel_err
