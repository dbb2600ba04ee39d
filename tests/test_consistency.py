"""Batch invariance and train-rollout consistency, bit for bit where the project owns the kernels.

- Every op's result for a row is independent of how many rows share the call and of the row's position in it: the
  row kernels always (one program per row, a fixed reduction order), the lm-head ops when
  ``REMAX_KERNELS_BATCH_INVARIANT=1`` fixes the shape of their GEMMs. Batch sizes 1, 7 and 64, at several offsets.
- The log-prob the sampling op reports for the token it picked equals, bitwise, what the log-prob ops compute for
  that token from the same logits (or hidden states and weights).
"""

from __future__ import annotations

import pytest
import torch

import remax_kernels as rk
from remax_kernels.ops import fused_linear_logprobs as flp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ("triton", "torch")
BATCHES = ((1, 0), (1, 41), (7, 0), (7, 13), (7, 57))  # (rows, offset) into a batch of 64
V, H = 1500, 48


@pytest.fixture
def invariant(monkeypatch):
    monkeypatch.setenv(flp.BATCH_INVARIANT_ENV_VAR, "1")


def _same_rows(full, part, offset: int, n: int, what: str) -> None:
    for i, (a, b) in enumerate(zip(full, part, strict=True)):
        assert torch.equal(a[offset : offset + n], b), f"{what}: output {i}, rows {offset}..{offset + n} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_is_batch_invariant(backend, device):
    logits = 3 * torch.randn(64, V, device=device)
    targets = torch.randint(0, V, (64,), device=device)
    run = lambda s: rk.token_logprobs(logits[s], targets[s], temperature=0.7, return_entropy=True, backend=backend)
    full = run(slice(None))
    for n, offset in BATCHES:
        _same_rows(full, run(slice(offset, offset + n)), offset, n, "token_logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_and_greedy_is_batch_invariant(backend, device):
    """With per-row seeds a row's token and log-prob depend on its own logits and seed only (top-p + min-p too)."""
    logits = 3 * torch.randn(64, V, device=device)
    greedy = torch.arange(64, device=device) % 3 == 0
    seeds = torch.randint(0, 2**40, (64,), device=device)
    run = lambda s: rk.sample_and_greedy(logits[s], greedy[s], temperature=0.8, top_p=0.9, min_p=0.01, seed=seeds[s],
                                         step=5, backend=backend)
    full = run(slice(None))
    for n, offset in BATCHES:
        _same_rows(full, run(slice(offset, offset + n)), offset, n, "sample_and_greedy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_is_batch_invariant(backend, device, invariant):
    hidden = torch.randn(64, H, device=device)
    weight = torch.randn(V, H, device=device) * H**-0.5
    bias = torch.randn(V, device=device)
    targets = torch.randint(0, V, (64,), device=device)
    targets[::5] = -100  # ignored rows are skipped: the valid rows' chunks and tiles shift
    run = lambda s: rk.fused_linear_logprobs(hidden[s], weight, targets[s], bias=bias, return_entropy=True,
                                             backend=backend)
    full = run(slice(None))
    for n, offset in BATCHES:
        _same_rows(full, run(slice(offset, offset + n)), offset, n, "fused_linear_logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_row_gradients_are_batch_invariant(backend, device, invariant):
    """A row's hidden-state gradient (from its own upstream gradients) does not depend on the batch either: the
    grad_hidden GEMM runs at the fixed shape too. (The policy loss runs the same pipeline.)"""
    hidden = torch.randn(64, H, device=device)
    weight = torch.randn(V, H, device=device) * H**-0.5
    targets = torch.randint(0, V, (64,), device=device)
    targets[3::7] = -100
    g_logp, g_entropy = torch.randn(64, device=device), torch.randn(64, device=device)

    def run(s):
        h = hidden[s].clone().requires_grad_()
        logp, entropy = rk.fused_linear_logprobs(h, weight, targets[s], return_entropy=True, backend=backend)
        ((logp * g_logp[s]).sum() + (entropy * g_entropy[s]).sum()).backward()
        return (h.grad,)

    full = run(slice(None))
    for n, offset in BATCHES:
        _same_rows(full, run(slice(offset, offset + n)), offset, n, "fused_linear_logprobs grad_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_logprobs_equal_the_logprob_op_bitwise(backend, dtype, device):
    """For the token the sampling op picked, its reported log-prob is bit for bit the log-prob op's on the same
    logits: "processed" (temperature, no truncation; greedy rows also under truncation) and "raw" (T = 1)."""
    logits = (3 * torch.randn(24, V, device=device)).to(dtype)
    greedy = torch.arange(24, device=device) % 2 == 0
    temperature = torch.rand(24, device=device) + 0.5
    for opts, mode, rows in ((dict(), "processed", slice(None)), (dict(top_p=0.8), "processed", greedy),
                             (dict(top_k=30), "raw", slice(None))):
        tokens, logp = rk.sample_and_greedy(logits, greedy, temperature=temperature, seed=7, step=2, logprobs=mode,
                                            backend=backend, **opts)
        for r in range(24) if isinstance(rows, slice) else torch.nonzero(rows).flatten().tolist():
            t = 1.0 if mode == "raw" else float(temperature[r])
            expected = rk.token_logprobs(logits[r : r + 1], tokens[r : r + 1], temperature=t, backend=backend)
            assert torch.equal(logp[r : r + 1], expected), (opts, mode, r, float(logp[r]), float(expected[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sampling_logprobs_equal_fused_linear_logprobs_bitwise(backend, device, invariant):
    """From hidden states and the lm-head weight (batch-invariant mode): the fused sampling op's tokens and
    log-probs are the logits op's, bit for bit, at any batch size."""
    hidden = torch.randn(20, H, device=device)
    weight = torch.randn(V, H, device=device) * H**-0.5
    bias = torch.randn(V, device=device)
    greedy = torch.arange(20, device=device) % 2 == 1
    seeds = torch.arange(20, device=device) * 3
    tokens, logp = rk.fused_linear_sample_and_greedy(hidden, weight, greedy, bias=bias, temperature=0.9, seed=seeds,
                                                     step=4, backend=backend)
    expected = rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias, temperature=0.9, backend=backend)
    assert torch.equal(logp, expected)
    for n, offset in ((1, 3), (7, 11)):
        part = rk.fused_linear_sample_and_greedy(hidden[offset : offset + n], weight, greedy[offset : offset + n],
                                                 bias=bias, temperature=0.9, seed=seeds[offset : offset + n], step=4,
                                                 backend=backend)
        _same_rows((tokens, logp), part, offset, n, "fused_linear_sample_and_greedy")
