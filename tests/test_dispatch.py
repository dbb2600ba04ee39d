"""The backend choice: explicit argument > REMAX_KERNELS_BACKEND > auto (CUDA/interpreter -> triton, else torch)."""

from __future__ import annotations

import pytest
import torch

from remax_kernels import _dispatch

CPU = torch.device("cpu")


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve_backend("auto", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve_backend("auto", CPU) == "torch"


def test_explicit_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "triton")
    assert _dispatch.resolve_backend("torch", CPU) == "torch"
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "torch")
    assert _dispatch.resolve_backend("auto", CPU) == "torch"
    assert _dispatch.resolve_backend("triton", CPU) == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.resolve_backend("triton", CPU)


@pytest.mark.parametrize("bad", ["cuda", "Triton", ""])
def test_unknown_backend_names_are_rejected(monkeypatch, bad):
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve_backend(bad, CPU)
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=_dispatch.BACKEND_ENV_VAR):
        _dispatch.resolve_backend("auto", CPU)


@pytest.mark.cuda
def test_auto_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    assert _dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"
