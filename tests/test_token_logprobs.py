"""token_logprobs: values and gradients vs the float64 reference, both backends, every option and input check.

On a machine without CUDA the "triton" backend runs the real kernels through the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes here stay small; the large-vocabulary cases beyond one interpreter case are
``@pytest.mark.cuda``.
"""

from __future__ import annotations

import itertools
import math
from unittest import mock

import pytest
import torch

import remax_kernels.ops.token_logprobs as tl_module
from remax_kernels import token_logprobs
from tests.helpers import assert_rel_close, rel_err
from tests.helpers.ref_logprobs import ref_token_logprobs

BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IGNORE = -100

# The interpreter evaluates masked-off lanes too (e.g. 0 * -inf, log(0) in ignored rows) and numpy warns about them;
# the kernels select those lanes away, and every value below is compared with the reference.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _inputs(shape, vocab, dtype, device, *, scale=3.0, n_ignored=1):
    """Random logits ``[*shape, vocab]`` (never zeros) and targets with a few ignored positions."""
    logits = (torch.randn(*shape, vocab, device=device) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, device=device)
    flat = targets.view(-1)
    if flat.numel() > 1:
        flat[torch.randperm(flat.numel(), device=device)[:n_ignored]] = IGNORE
    return logits, targets


def _reference(logits, targets, g_logp, g_entropy, temperature=1.0):
    """float64 (logp, entropy, grad of sum(g_logp * logp + g_entropy * entropy) w.r.t. logits)."""
    x = logits.detach().double().requires_grad_(True)
    logp, entropy = ref_token_logprobs(x, targets, temperature=temperature, ignore_index=IGNORE)
    loss = (logp * g_logp.double()).sum()
    if g_entropy is not None:
        loss = loss + (entropy * g_entropy.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), entropy.detach(), grad


def _run(logits, targets, g_logp, g_entropy, *, view=None, **kwargs):
    """(logp, entropy or None, grad w.r.t. the op's input) from token_logprobs with the given upstream gradients.

    The op's input is ``view(copy of logits)`` when ``view`` is given (a strided view of a fresh leaf; ``clone()``
    of a view would come out contiguous), else a fresh copy of ``logits``.
    """
    base = logits.detach().clone().requires_grad_(True)
    x = view(base) if view is not None else base
    # The backend asked for must really run, forward and backward.
    impl = {"triton": "_triton", "torch": "_torch"}[kwargs["backend"]]
    with mock.patch.object(tl_module, impl + "_forward", wraps=getattr(tl_module, impl + "_forward")) as fwd, \
            mock.patch.object(tl_module, impl + "_backward", wraps=getattr(tl_module, impl + "_backward")) as bwd:
        out = token_logprobs(x, targets, return_entropy=g_entropy is not None, **kwargs)
        logp, entropy = out if g_entropy is not None else (out, None)
        loss = (logp * g_logp).sum() + ((entropy * g_entropy).sum() if g_entropy is not None else 0.0)
        (grad,) = torch.autograd.grad(loss, x)
    assert fwd.call_count == 1 and bwd.call_count == 1
    return logp.detach(), None if entropy is None else entropy.detach(), grad


def _check_against_reference(logits, targets, *, backend, view=None, temperature=1.0, with_entropy=True, scale=1.0):
    g_logp = torch.randn(targets.shape, device=logits.device)
    g_entropy = torch.randn(targets.shape, device=logits.device) if with_entropy else None
    logp, entropy, grad = _run(
        logits, targets, g_logp, g_entropy, view=view, temperature=temperature, backend=backend
    )
    viewed = view(logits) if view is not None else logits
    ref_logp, ref_entropy, ref_grad = _reference(viewed, targets, g_logp, g_entropy, temperature)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == viewed.shape
    # The inputs are exactly representable, so log-probs/entropy (fp32 outputs, fp32 accumulation) are held to the
    # fp32 tolerance whatever the input dtype; the gradient is stored in the input dtype, so it gets that tolerance.
    assert_rel_close(logp, ref_logp, torch.float32, name="logprobs", scale=scale)
    if with_entropy:
        assert entropy.dtype == torch.float32 and entropy.shape == targets.shape
        assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy", scale=scale)
    assert_rel_close(grad, ref_grad, logits.dtype, name="grad_logits", scale=scale)
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (grad[ignored] == 0).all()
    return logp, entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,vocab", [((5,), 37), ((3,), 1000), ((2, 3), 5003)], ids=["tiny", "V1000", "3d-V5003"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_float64_reference(device, backend, dtype, shape, vocab, temperature):
    logits, targets = _inputs(shape, vocab, dtype, device)
    logp, entropy = _check_against_reference(logits, targets, backend=backend, temperature=temperature)
    assert (logp <= 0).all()
    assert (entropy >= 0).all() and (entropy <= math.log(vocab) + 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_151936(device, backend):
    logits, targets = _inputs((2,), 151_936, torch.bfloat16, device, n_ignored=0)
    _check_against_reference(logits, targets, backend=backend, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_grad_through_one_output_only(device, backend, with_entropy):
    """Only entropy used (logp's upstream grad is None), or logp returned alone."""
    logits, targets = _inputs((4,), 300, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    if with_entropy:
        _, entropy = token_logprobs(x, targets, return_entropy=True, backend=backend)
        g = torch.randn(4, device=device)
        (entropy * g).sum().backward()
        _, _, ref_grad = _reference(logits, targets, torch.zeros(4, device=device), g)
    else:
        logp = token_logprobs(x, targets, backend=backend)
        g = torch.randn(4, device=device)
        (logp * g).sum().backward()
        _, _, ref_grad = _reference(logits, targets, g, None)
    assert_rel_close(x.grad, ref_grad, torch.float32, name="grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_online_max_moving_across_blocks_and_large_logits(device, backend, temperature):
    """Row maxima in the last (ragged) block and in the first block, and logits offset by +-1000.

    At |z| ~ 1000 fp32 itself rounds z = x / T by ~1e-4, so the bound is the house rule: the op's error against
    float64 is at most twice that of plain torch in fp32 (log_softmax + autograd) on the same inputs.
    """
    vocab = 5003  # two 4096-wide kernel blocks, the second one ragged
    logits = torch.randn(4, vocab, device=device) * 4
    logits[0, -1] += 60.0
    logits[1, 0] += 60.0
    logits[2] += 1000.0
    logits[3] -= 1000.0
    targets = torch.tensor([vocab - 1, 5, 17, vocab - 2], device=device)
    g_logp, g_entropy = torch.randn(4, device=device), torch.randn(4, device=device)

    def outputs(fn, x):
        x = x.clone().requires_grad_(True)
        logp, entropy = fn(x)
        (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), x)
        return logp, entropy, grad

    def plain_torch(x):
        log_p = torch.log_softmax(x / temperature, dim=-1)
        return log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)

    ours = outputs(lambda x: token_logprobs(x, targets, temperature=temperature, return_entropy=True,
                                            backend=backend), logits)
    plain = outputs(plain_torch, logits)
    ref = outputs(lambda x: ref_token_logprobs(x, targets, temperature=temperature), logits.double())
    for name, o, p, r in zip(("logprobs", "entropy", "grad_logits"), ours, plain, ref, strict=True):
        assert rel_err(o, r) <= 2 * rel_err(p, r) + 1e-7, (name, rel_err(o, r), rel_err(p, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_never_positive_and_entropy_in_range(device, backend, dtype):
    """verl #2656: log-probs of a dominant target must come out <= 0, never slightly positive."""
    vocab = 777
    logits = torch.randn(6, vocab, device=device)
    targets = torch.randint(0, vocab, (6,), device=device)
    logits[torch.arange(6), targets] = torch.tensor([30.0, 60.0, 100.0, 200.0, 15.0, 8.0], device=device)
    logits[5] = 2.5  # uniform row: entropy exactly log V
    logits = logits.to(dtype)
    logp, entropy = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert (logp <= 0).all(), logp
    assert (entropy >= 0).all() and (entropy <= math.log(vocab) + 1e-5).all(), entropy
    assert abs(entropy[5].item() - math.log(vocab)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_is_read_in_place(device, backend):
    """logits[:, :-1] of a [B, T, V] tensor: no copy (the saved rows ARE the view), right values and gradients."""
    full = torch.randn(2, 6, 1001, device=device) * 3
    view = full[:, :-1]
    assert not view.is_contiguous()
    rows, layout = tl_module._readable_rows(view)
    assert rows is view and layout == (5, 6 * 1001, 1001)
    input_ids = torch.randint(0, 1001, (2, 6), device=device)
    targets = input_ids[:, 1:]  # the usual shifted targets: a non-contiguous view too
    _check_against_reference(full, targets, view=lambda t: t[:, :-1], backend=backend, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_writes_logits_storage(device, backend, dtype):
    full = (torch.randn(2, 6, 523, device=device) * 3).to(dtype)
    targets = torch.randint(0, 523, (2, 5), device=device)
    targets[1, 2] = IGNORE  # its gradient row must be written as zeros over the old logits
    g_logp, g_entropy = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)

    expected = _run(full, targets, g_logp, g_entropy, view=lambda t: t[:, :-1], temperature=0.7, backend=backend)[2]

    base = full.clone().requires_grad_(True)
    view = base[:, :-1]
    last_column = base[:, -1].detach().clone()
    logp, entropy = token_logprobs(view, targets, temperature=0.7, return_entropy=True, inplace_backward=True,
                                   backend=backend)
    (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), view)
    assert grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()
    assert torch.equal(grad, expected)  # same math, same rounding as the out-of-place backward
    assert torch.equal(base.detach()[:, :-1], expected)  # the logits were overwritten with the gradient
    assert torch.equal(base.detach()[:, -1], last_column)  # nothing outside the view was touched


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_bumps_version_so_misuse_raises(device, backend):
    """Another autograd node that saved the same logits must fail loudly, not differentiate through a gradient."""
    x = torch.randn(3, 50, device=device, requires_grad=True)
    logits = torch.exp(x)  # exp saves its output (the logits) for its own backward
    targets = torch.randint(0, 50, (3,), device=device)
    logp = token_logprobs(logits, targets, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_that_need_a_copy(device, backend):
    """Permuted 4-D leading dims (three strides) and a non-contiguous last dim are copied; inplace_backward then
    overwrites the copy and leaves the caller's logits alone."""
    base = torch.randn(3, 2, 4, 61, device=device) * 2
    permute = lambda t: t.permute(1, 0, 2, 3)[:, :, :3]
    assert tl_module._row_layout(permute(base)) is None
    targets = torch.randint(0, 61, permute(base).shape[:-1], device=device)
    _check_against_reference(base, targets, view=permute, backend=backend)
    assert tl_module._readable_rows(permute(base))[0].is_contiguous()

    transposed = torch.randn(61, 7, device=device)
    targets = torch.randint(0, 61, (7,), device=device)
    _check_against_reference(transposed, targets, view=lambda t: t.t(), backend=backend)

    x = base.clone().requires_grad_(True)
    before = x.detach().clone()
    logp = token_logprobs(permute(x), targets.new_zeros(permute(x).shape[:-1]), inplace_backward=True, backend=backend)
    logp.sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_view_without_copy(device, backend):
    """A stride-0 leading dim (one row of logits scored against several targets) is read in place."""
    row = torch.randn(1, 2, 300, device=device) * 2
    expand = lambda t: t.expand(3, 2, 300)
    assert tl_module._readable_rows(expand(row))[0].stride(0) == 0
    _check_against_reference(row, torch.randint(0, 300, (3, 2), device=device), view=expand, backend=backend)


def test_row_layout_addresses_every_row(device):
    """For several views, (r // T1) * s0 + (r % T1) * s1 points at row r of reshape(-1, V), and the torch path's
    chunk walk yields every row once, in order, without copies."""
    base = torch.randn(4, 6, 5, 9, device=device)
    views = [base, base[:, :-1], base[::2], base[:, 2], base[1:, :, 1:4], base[:1, :1], base[0, 0, 0], base[:, :, :1],
             base[1:, 2:-1, 1]]
    for v in views:
        layout = tl_module._row_layout(v)
        assert layout is not None, v.shape
        t1, s0, s1 = layout
        rows = v.reshape(-1, v.shape[-1])
        flat = base.view(-1)
        offset = v.storage_offset()
        for r in range(rows.shape[0]):
            start = offset + (r // t1) * s0 + (r % t1) * s1
            assert torch.equal(flat[start : start + v.shape[-1]], rows[r]), (v.shape, r)
        for chunk_rows in (1, 4):
            chunks = list(tl_module._row_chunks(v, layout, chunk_rows))
            assert all(c.data_ptr() >= base.data_ptr() and c.shape[0] * c.shape[1] <= chunk_rows for _, c in chunks)
            assert [r for r, _ in chunks] == list(itertools.accumulate([0] + [c.shape[0] * c.shape[1]
                                                                              for _, c in chunks[:-1]]))
            assert torch.equal(torch.cat([c.reshape(-1, v.shape[-1]) for _, c in chunks]), rows)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_path_chunks_and_strided_views(device, monkeypatch, inplace):
    """Force tiny chunks so the torch path crosses chunk and sequence boundaries in both of its walk orders."""
    vocab = 97
    full = torch.randn(3, 7, vocab, device=device) * 2
    view = full[:, :-1]
    targets = torch.randint(0, vocab, (3, 6), device=device)
    targets[2, 0] = IGNORE
    g_logp, g_entropy = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    ref_logp, ref_entropy, ref_grad = _reference(view, targets, g_logp, g_entropy, 0.7)
    seen_rows = []

    def spy(fn):
        def wrapped(chunk, *args):
            seen_rows.append(chunk.shape[0])
            return fn(chunk, *args)

        return wrapped

    monkeypatch.setattr(tl_module, "logprobs_entropy_chunk", spy(tl_module.logprobs_entropy_chunk))
    monkeypatch.setattr(tl_module, "grad_logits_chunk", spy(tl_module.grad_logits_chunk))
    for chunk_rows in (4, 14):  # < T1 = 6: chunks within a sequence; > T1: whole sequences per chunk
        monkeypatch.setattr(tl_module, "_TORCH_CHUNK_ELEMENTS", chunk_rows * vocab)
        seen_rows.clear()
        x = full.clone().requires_grad_(True)
        v = x[:, :-1]
        logp, entropy = token_logprobs(v, targets, temperature=0.7, return_entropy=True, inplace_backward=inplace,
                                       backend="torch")
        (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), v)
        assert_rel_close(logp, ref_logp, torch.float32, name="logprobs")
        assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy")
        assert_rel_close(grad, ref_grad, torch.float32, name="grad_logits")
        # O(chunk x V) extra memory: the fp32 math never sees more rows than a chunk, forward and backward, and
        # between them every row is covered exactly twice.
        assert max(seen_rows) <= chunk_rows and sum(seen_rows) == 2 * 18 and len(seen_rows) >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_match_int64(device, backend):
    logits, targets = _inputs((2, 4), 300, torch.float32, device)
    a = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    b = token_logprobs(logits, targets.int(), return_entropy=True, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(device, backend, monkeypatch):
    """Buffers the op allocates start as NaN; every output element (ignored rows included) must be overwritten."""
    real_empty = torch.empty

    def nan_empty(*size, dtype=None, device=None, **kwargs):
        out = real_empty(*size, dtype=dtype, device=device, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    logits, targets = _inputs((5,), 300, torch.float32, device, n_ignored=2)
    monkeypatch.setattr(tl_module.torch, "empty", nan_empty)
    assert torch.isnan(tl_module.torch.empty(3, device=device)).all()
    _check_against_reference(logits, targets, backend=backend, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_rows_stay_isolated(device, backend):
    logits, targets = _inputs((6,), 700, torch.float32, device, n_ignored=0)
    g_logp, g_entropy = torch.randn(6, device=device), torch.randn(6, device=device)
    clean = _run(logits, targets, g_logp, g_entropy, backend=backend)
    bad = logits.clone()
    bad[1, 10] = float("nan")
    bad[4, 3] = float("inf")
    logp, entropy, grad = _run(bad, targets, g_logp, g_entropy, backend=backend)
    good = torch.tensor([0, 2, 3, 5], device=device)
    for out, ref in zip((logp, entropy, grad), clean, strict=True):
        assert torch.isnan(out[1]).all() and torch.isnan(out[4]).all()
        assert torch.equal(out[good], ref[good])  # bitwise: rows never mix


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_batch(device, backend, inplace):
    for shape in ((0, 50), (2, 0, 50)):
        x = torch.randn(shape, device=device, requires_grad=True)
        targets = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        logp, entropy = token_logprobs(x, targets, return_entropy=True, inplace_backward=inplace, backend=backend)
        assert logp.shape == entropy.shape == shape[:-1] and logp.dtype == entropy.dtype == torch.float32
        (logp.sum() + entropy.sum()).backward()
        assert x.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(device, backend):
    logits = torch.randn(3, 40, device=device, requires_grad=True)
    targets = torch.full((3,), IGNORE, device=device)
    logp, entropy = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all() and (logits.grad == 0).all()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda d: (torch.randint(0, 5, (3, 10), device=d), torch.zeros(3, dtype=torch.long, device=d), {}),
         TypeError, "logits: dtype"),
        (lambda d: (torch.randn(3, 10, dtype=torch.float64, device=d), torch.zeros(3, dtype=torch.long, device=d), {}),
         TypeError, "logits: dtype"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, device=d), {}), TypeError, "targets: dtype"),
        (lambda d: ([[0.0] * 10], torch.zeros(1, dtype=torch.long, device=d), {}), TypeError, "logits"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(4, dtype=torch.long, device=d), {}),
         ValueError, r"targets: expected shape \(3,\)"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device="meta"), {}),
         ValueError, "targets: is on meta"),
        (lambda d: (torch.randn(3, 10, device=d), torch.tensor([0, 10, 3], device=d), {}),
         ValueError, "targets: 1 values >= vocab size 10"),
        (lambda d: (torch.randn(3, 10, device=d), torch.tensor([0, -1, 3], device=d), {}),
         ValueError, "targets: 1 negative values other than ignore_index=-100"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device=d), {"temperature": 0.0}),
         ValueError, "temperature"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device=d),
                    {"temperature": float("nan")}), ValueError, "temperature"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device=d), {"ignore_index": 1.5}),
         TypeError, "ignore_index"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device=d),
                    {"return_entropy": "yes"}), TypeError, "return_entropy"),
        (lambda d: (torch.randn(3, 10, device=d), torch.zeros(3, dtype=torch.long, device=d), {"backend": "gpu"}),
         ValueError, "backend"),
        (lambda d: (torch.randn((), device=d), torch.zeros((), dtype=torch.long, device=d), {}),
         ValueError, "logits: expected shape"),
        (lambda d: (torch.randn(3, 0, device=d), torch.zeros(3, dtype=torch.long, device=d), {}),
         ValueError, "logits: the vocabulary"),
        (lambda d: (torch.randn(1, 10, device=d).expand(3, 10), torch.zeros(3, dtype=torch.long, device=d),
                    {"inplace_backward": True}), ValueError, "inplace_backward: logits has a stride-0"),
    ],
    ids=["int-logits", "float64-logits", "float-targets", "list-logits", "shape", "device", "too-large",
         "negative", "temperature-0", "temperature-nan", "ignore-index-float", "flag-type", "backend", "0d", "V=0",
         "inplace-expanded"],
)
def test_bad_inputs_raise_naming_the_argument(device, make, error, match):
    logits, targets, kwargs = make(device)
    with pytest.raises(error, match=match):
        token_logprobs(logits, targets, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [32_000, 128_256, 151_936])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_large_vocab(vocab, dtype):
    logits, targets = _inputs((4, 33), vocab, dtype, torch.device("cuda"), n_ignored=5)
    _check_against_reference(logits, targets[:, :-1], view=lambda t: t[:, :-1], backend="triton", temperature=0.7)


@pytest.mark.cuda
def test_cuda_memory_no_logits_copy_and_inplace_has_no_grad_buffer():
    """Forward on a [B, T-1, V] view allocates only O(N) floats; in-place backward allocates no [N, V] buffer."""
    B, T, V = 8, 257, 151_936
    full = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (B, T - 1), device="cuda")
    logits_bytes = B * (T - 1) * V * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    view = full[:, :-1]
    logp, entropy = token_logprobs(view, targets, return_entropy=True, inplace_backward=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - start < logits_bytes // 100
    torch.cuda.reset_peak_memory_stats()
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), view)
    torch.cuda.synchronize()
    assert grad.data_ptr() == view.data_ptr()
    assert torch.cuda.max_memory_allocated() - start < logits_bytes // 100
