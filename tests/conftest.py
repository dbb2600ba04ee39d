"""Test set-up: CUDA tensors when a GPU is present, else CPU tensors with Triton's interpreter.

TRITON_INTERPRET must be in the environment before triton is imported, so it is set here, at collection time,
before any test module imports remax_kernels. On a CUDA machine it is left alone (unset = compiled kernels).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where op tests put their tensors: the GPU when there is one, else the CPU (Triton via the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
