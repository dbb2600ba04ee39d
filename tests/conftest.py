"""Test set-up: CUDA tensors when a GPU is present, else CPU tensors with Triton's interpreter.

TRITON_INTERPRET must be in the environment before triton is imported, so it is set here, at collection time,
before any test module imports remax_kernels. On a CUDA machine it is left alone (unset = compiled kernels).
With TRITON_INTERPRET=0 on a CPU machine (CI's rehearsal of the GPU machine's setting, interpreter off), the Triton
cases of tests on the ``device`` fixture are skipped; any other test that needs the interpreter fails.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import triton_runs_on_cpu  # noqa: E402

_SKIP_TRITON_REASON = "backend='triton' on the device fixture's CPU tensors needs TRITON_INTERPRET=1 (it is off)"


def _interpreter_off_without_gpu() -> bool:
    """CI's interpreter-off run (TRITON_INTERPRET=0, no GPU): where the GPU machine's setting is rehearsed."""
    return not torch.cuda.is_available() and not triton_runs_on_cpu()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason=_SKIP_TRITON_REASON)
    interpreter_off = _interpreter_off_without_gpu()
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
        elif interpreter_off and _uses_device_fixture(item) and _param(item, "backend") == "triton":
            item.add_marker(skip_triton)


def _uses_device_fixture(item) -> bool:
    return "device" in getattr(item, "fixturenames", ())


def _param(item, name: str):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


@pytest.fixture
def device() -> torch.device:
    """Where op tests put their tensors: the GPU when there is one, else the CPU (Triton via the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
