"""The backend choice: explicit argument > REMAX_KERNELS_BACKEND > auto (CUDA/interpreter -> triton, else torch;
the per-op AUTO_ON_CUDA table for ops with a CUDA kernel)."""

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


@pytest.mark.parametrize("bad", ["gpu", "Triton", ""])
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


def test_cuda_backend_errors_name_what_is_missing(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="has no CUDA kernel"):
        _dispatch.resolve_backend("cuda", CPU)  # an op without a CUDA kernel passes no op name
    with pytest.raises(RuntimeError, match="tensors are on cpu"):
        _dispatch.resolve_backend("cuda", CPU, op="sample_and_greedy")
    monkeypatch.setattr(_dispatch, "_cuda_extension_available", lambda: False)
    with pytest.raises(RuntimeError, match="not built.*REMAX_KERNELS_BUILD_CUDA=1"):
        _dispatch.resolve_backend("cuda", torch.device("cuda"), op="sample_and_greedy")


def test_cuda_from_the_environment_falls_back_where_there_is_no_cuda_kernel(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve_backend("auto", CPU) == "torch"
    assert _dispatch.resolve_backend("auto", CPU, op="sample_and_greedy") == "torch"
    monkeypatch.setattr(_dispatch, "_cuda_extension_available", lambda: True)
    assert _dispatch.resolve_backend("auto", torch.device("cuda"), op="sample_and_greedy") == "cuda"


def test_auto_on_cuda_follows_the_measured_table(monkeypatch):
    # Until a GPU measurement says otherwise every entry is "triton"; an entry set to "cuda" takes effect only
    # where the extension is built.
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    assert set(_dispatch.AUTO_ON_CUDA.values()) <= {"triton", "cuda"}
    cuda = torch.device("cuda")
    monkeypatch.setitem(_dispatch.AUTO_ON_CUDA, "sample_and_greedy", "cuda")
    monkeypatch.setattr(_dispatch, "_cuda_extension_available", lambda: True)
    assert _dispatch.resolve_backend("auto", cuda, op="sample_and_greedy") == "cuda"
    monkeypatch.setattr(_dispatch, "_cuda_extension_available", lambda: False)
    assert _dispatch.resolve_backend("auto", cuda, op="sample_and_greedy") in ("triton", "torch")
    assert _dispatch.resolve_backend("auto", cuda, op="token_logprobs_without_cuda") in ("triton", "torch")


def test_cuda_extension_is_loaded_lazily():
    # Importing the package must not import the extension; asking whether it is available does, and answers False
    # (with the reason) where it is not built.
    import subprocess
    import sys

    code = ("import sys, remax_kernels; assert 'remax_kernels._C' not in sys.modules; "
            "from remax_kernels import _cuda; ok = _cuda.available(); "
            "assert ok == ('remax_kernels._C' in sys.modules), ok")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_ops_route_backend_cuda(monkeypatch):
    """backend="cuda" on the row-kernel ops reaches the dispatcher with their op name: on CPU tensors a clear error
    naming where the tensors are (token_logprobs and the lm-head ops share the row kernel)."""
    import remax_kernels as rk

    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)
    logits, targets = torch.randn(3, 10), torch.randint(0, 10, (3,))
    with pytest.raises(RuntimeError, match="tensors are on cpu"):
        rk.token_logprobs(logits, targets, backend="cuda")
    with pytest.raises(RuntimeError, match="tensors are on cpu"):
        rk.fused_linear_logprobs(torch.randn(3, 4), torch.randn(10, 4), targets, backend="cuda")
