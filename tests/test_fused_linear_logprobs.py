"""fused_linear_logprobs vs a float64 reference that materializes the logits: values and the gradients for hidden,
weight and bias (through log-probs and entropy, with random per-token upstream gradients), on both backends.
Triton runs through the interpreter on CPU (fp32/fp16; bf16 on a GPU: the interpreter's bf16 tl.dot is wrong)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import remax_kernels.ops.fused_linear_logprobs as flp
from remax_kernels import fused_linear_logprobs
from tests.helpers import REL_TOL, assert_rel_close, poison_like, rel_err, triton_runs_on_cpu
from tests.helpers.ref_logprobs import ref_fused_linear_logprobs

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]

CASES = {
    # log-probs only, no bias, T = 1, one ignored row.
    "plain": dict(shape=(37,), H=72, V=203, n_ignored=1),
    # bias, temperature, entropy returned, gradients through both outputs, several ignored rows.
    "bias-temp-entropy": dict(shape=(37,), H=72, V=203, bias=True, temperature=0.7, entropy=True, n_ignored=5),
    # 3-D hidden, int32 targets, a custom ignore_index, the gradient flowing through the entropy only.
    "3d-int32-entropy-only": dict(shape=(3, 7), H=40, V=97, int32=True, ignore_index=-1, temperature=1.3,
                                  entropy=True, grad_logp=False, n_ignored=4),
}


@pytest.fixture(autouse=True)
def _poison_and_small_chunks(monkeypatch):
    """Buffers the op fills start as NaN (an unwritten element shows up in the comparison), and the pipeline runs
    several chunks of rows (~7 rows at V=203 in fp32) instead of one."""
    monkeypatch.setattr(flp, "_new_buffer", lambda shape, device: poison_like(shape, torch.float32, device))
    monkeypatch.setenv(flp.CHUNK_ENV_VAR, str(6000 / 2**20))


def make_inputs(dtype, device, *, shape, H, V, bias=False, int32=False, ignore_index=-100, n_ignored=0,
                weight_scale=2.0, **_):
    """Logits with std ~weight_scale; the last vocabulary entry (ragged block edge) is one of the targets."""
    hidden = torch.randn(*shape, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * weight_scale * H**-0.5).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, shape, device=device)
    flat = targets.view(-1)
    flat[0] = V - 1
    flat[torch.randperm(flat.numel() - 1, device=device)[:n_ignored] + 1] = ignore_index
    return hidden, weight, b, targets.to(torch.int32) if int32 else targets


def run_op(hidden, weight, bias, targets, upstream, *, backend, temperature=1.0, ignore_index=-100, entropy=False,
           grad_logp=True):
    """Forward + backward of sum(g_logp * logp + g_entropy * entropy); returns (logp, entropy, grads)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                ignore_index=ignore_index, return_entropy=entropy, backend=backend)
    logp, ent = out if entropy else (out, None)
    loss = ent * upstream[1] if ent is not None else 0.0
    if grad_logp:
        loss = loss + logp * upstream[0]
    loss.sum().backward()
    return logp, ent, [t.grad if t is not None else None for t in leaves]


def run_ref(hidden, weight, bias, targets, upstream, *, temperature=1.0, ignore_index=-100, entropy=False,
            grad_logp=True):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, ent = ref_fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                          ignore_index=ignore_index)
    loss = ent * upstream[1].double() if entropy else 0.0
    if grad_logp:
        loss = loss + logp * upstream[0].double()
    loss.sum().backward()
    return logp, ent if entropy else None, [t.grad if t is not None else None for t in leaves]


def compare(got, ref, dtype, *, scale=1.0):
    (logp, ent, grads), (ref_logp, ref_ent, ref_grads) = got, ref
    assert logp.dtype == torch.float32
    assert_rel_close(logp, ref_logp, dtype, name="logprobs", scale=scale)
    if ref_ent is not None:
        assert ent.dtype == torch.float32
        assert_rel_close(ent, ref_ent, dtype, name="entropy", scale=scale)
    for name, g, rg in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads, strict=True):
        if rg is None:
            assert g is None, name
            continue
        assert_rel_close(g, rg, dtype, name=name, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, backend, device):
    spec = CASES[case]
    opts = {k: spec[k] for k in ("temperature", "ignore_index", "entropy", "grad_logp") if k in spec}
    hidden, weight, bias, targets = make_inputs(dtype, device, **spec)
    upstream = (torch.randn(targets.shape, device=device), torch.randn(targets.shape, device=device))

    got = run_op(hidden, weight, bias, targets, upstream, backend=backend, **opts)
    compare(got, run_ref(hidden, weight, bias, targets, upstream, **opts), dtype)

    logp, ent, (grad_hidden, _, _) = got
    assert logp.shape == targets.shape and grad_hidden.shape == hidden.shape
    ignored = targets == opts.get("ignore_index", -100)
    assert ignored.sum() == spec["n_ignored"]
    # Ignored positions: exactly 0 and exactly no gradient.
    assert (logp[ignored] == 0).all()
    assert ent is None or (ent[ignored] == 0).all()
    assert (grad_hidden[ignored] == 0).all()


def test_chunks_are_even_and_cover_the_valid_rows():
    """The test shapes above run as several chunks of about equal size; only valid rows are chunked."""
    for spec in CASES.values():
        n_valid = torch.Size(spec["shape"]).numel() - spec["n_ignored"]
        rows = flp.chunk_rows(n_valid, spec["V"], torch.float32, torch.device("cpu"))
        n_chunks = -(-n_valid // rows)
        assert n_chunks >= 2 and n_chunks * rows - n_valid < n_chunks, spec
    # The budget: 1 GiB of bf16 logits at V = 128256 is 4186 rows, evened out over 8192 rows -> 2 chunks of 4096.
    os.environ.pop(flp.CHUNK_ENV_VAR)
    assert flp.chunk_rows(8192, 128256, torch.bfloat16, torch.device("cuda")) == 4096
    # Never fewer rows than keep a GEMM efficient on a GPU, even at a huge vocabulary.
    assert flp.chunk_rows(8192, 2**24, torch.float32, torch.device("cuda")) == 512


def test_ignored_rows_never_enter_a_matmul(monkeypatch):
    """Only the valid rows reach the GEMMs: the chunks' hidden states are the valid rows, in order."""
    hidden, weight, _, targets = make_inputs(torch.float32, "cpu", shape=(30,), H=16, V=50, n_ignored=11)
    seen = []
    original = flp.LmHead.logits

    def spy(self, hidden_c):
        seen.append(hidden_c)
        return original(self, hidden_c)

    monkeypatch.setattr(flp.LmHead, "logits", spy)
    logp = fused_linear_logprobs(hidden.requires_grad_(), weight, targets, backend="torch")
    assert torch.equal(torch.cat(seen), hidden.detach()[targets != -100])
    seen.clear()
    logp.sum().backward()  # the backward recomputes the same rows
    assert torch.equal(torch.cat(seen), hidden.detach()[targets != -100])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_on_cpu(backend):
    """bf16 on CPU: the torch path, and the interpreter's Triton path (which upcasts the dot operands there)."""
    if backend == "triton" and not triton_runs_on_cpu():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (off; bf16 on CUDA: the dtype-parametrized tests)")
    spec = CASES["bias-temp-entropy"]
    hidden, weight, bias, targets = make_inputs(torch.bfloat16, "cpu", **spec)
    upstream = (torch.randn(targets.shape), torch.randn(targets.shape))
    opts = dict(temperature=spec["temperature"], entropy=True)
    compare(run_op(hidden, weight, bias, targets, upstream, backend=backend, **opts),
            run_ref(hidden, weight, bias, targets, upstream, **opts), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_each_gradient_slot_alone(which, backend, device):
    """Only one input requires grad: that gradient is right and the others stay None (frozen lm-head, ...)."""
    hidden, weight, bias, targets = make_inputs(torch.float32, device, shape=(21,), H=40, V=97, bias=True,
                                                n_ignored=2)
    g_logp, g_ent = torch.randn(21, device=device), torch.randn(21, device=device)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    leaves[which].requires_grad_()
    logp, ent = fused_linear_logprobs(leaves["hidden"], leaves["weight"], targets, bias=leaves["bias"],
                                      return_entropy=True, backend=backend)
    (logp * g_logp + ent * g_ent).sum().backward()
    ref = {k: v.double().requires_grad_(k == which) for k, v in (("hidden", hidden), ("weight", weight),
                                                                 ("bias", bias))}
    ref_logp, ref_ent = ref_fused_linear_logprobs(ref["hidden"], ref["weight"], targets, bias=ref["bias"])
    (ref_logp * g_logp.double() + ref_ent * g_ent.double()).sum().backward()
    for name, t in leaves.items():
        if name == which:
            assert_rel_close(t.grad, ref[name].grad, torch.float32, name=f"grad_{name}")
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, device):
    """A strided hidden view and a transposed weight view (e.g. a tied embedding stored [H, V]) are read in place."""
    H, V = 40, 97
    hidden = torch.randn(15, 2 * H, device=device)[:, ::2]
    weight = torch.randn(H, V, device=device).T * 2 * H**-0.5
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    targets = torch.randint(0, V, (15,), device=device)
    upstream = (torch.randn(15, device=device), torch.randn(15, device=device))
    got = run_op(hidden, weight, None, targets, upstream, backend=backend, entropy=True)
    compare(got, run_ref(hidden, weight, None, targets, upstream, entropy=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device):
    """Bitwise the same outputs and gradients on a second run (no atomics, no lock-ordered merge)."""
    spec = CASES["bias-temp-entropy"]
    hidden, weight, bias, targets = make_inputs(torch.float32, device, **spec)
    upstream = (torch.randn(targets.shape, device=device), torch.randn(targets.shape, device=device))
    opts = dict(temperature=spec["temperature"], entropy=True)
    first = run_op(hidden, weight, bias, targets, upstream, backend=backend, **opts)
    second = run_op(hidden, weight, bias, targets, upstream, backend=backend, **opts)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_never_positive_for_peaked_distributions(backend, device):
    """Very large logits at low temperature, half the targets the argmax (log-prob ~ 0): never > 0 (verl #2656),
    and still equal to the float64 reference (the online logsumexp must not overflow)."""
    hidden, weight, bias, targets = make_inputs(torch.float32, device, shape=(40,), H=48, V=150, bias=True,
                                                weight_scale=40.0)
    with torch.no_grad():
        argmax = (hidden @ weight.T + bias).argmax(-1)
    targets[::2] = argmax[::2]
    logp, ent = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.25, return_entropy=True,
                                      backend=backend)
    ref_logp, ref_ent = ref_fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.25)
    assert (logp <= 0).all(), logp.max()
    assert ref_logp[::2].max() > -1e-3  # the argmax rows really are near 0
    assert_rel_close(logp, ref_logp, torch.float32, name="logprobs")
    assert_rel_close(ent, ref_ent, torch.float32, name="entropy", scale=10.0)  # near-one-hot: entropy ~ 0


# NaN/inf inputs make numpy (the interpreter) warn; they are the point of the test.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_stays_in_its_row(backend, device):
    """A NaN hidden state gives NaN log-prob/entropy/grad_hidden in that row only; the other rows are exact."""
    hidden, weight, bias, targets = make_inputs(torch.float32, device, shape=(20,), H=40, V=97, bias=True)
    upstream = (torch.randn(20, device=device), torch.randn(20, device=device))
    hidden[5] = float("nan")
    logp, ent, (grad_hidden, _, _) = run_op(hidden, weight, bias, targets, upstream, backend=backend, entropy=True)
    others = torch.arange(20, device=device) != 5
    assert logp[5].isnan() and ent[5].isnan() and grad_hidden[5].isnan().all()
    clean = hidden.masked_fill(~others[:, None], 0.0)
    ref_logp, ref_ent, (ref_gh, _, _) = run_ref(clean, weight, bias, targets, upstream, entropy=True)
    assert_rel_close(logp[others], ref_logp[others], torch.float32, name="logprobs")
    assert_rel_close(ent[others], ref_ent[others], torch.float32, name="entropy")
    assert_rel_close(grad_hidden[others], ref_gh[others], torch.float32, name="grad_hidden")


# NaN/inf inputs make numpy (the interpreter) warn; they are the point of the test.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_ignored_row_sends_no_gradient(backend, device):
    """Padding rows (ignored targets) may hold NaN/inf hidden states: log-prob 0 there, every gradient finite and
    equal to the reference with those rows zeroed."""
    hidden, weight, bias, targets = make_inputs(torch.float32, device, shape=(20,), H=40, V=97, bias=True)
    upstream = (torch.randn(20, device=device), torch.randn(20, device=device))
    targets[[3, 17]] = -100
    hidden[3], hidden[17] = float("nan"), float("inf")
    logp, ent, grads = run_op(hidden, weight, bias, targets, upstream, backend=backend, entropy=True)
    assert logp[3] == 0 and logp[17] == 0 and ent[3] == 0 and ent[17] == 0
    ref = run_ref(hidden.nan_to_num(0.0, 0.0, 0.0), weight, bias, targets, upstream, entropy=True)
    compare((logp, ent, grads), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_batch(shape, backend, device):
    hidden = torch.randn(*shape, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    bias = torch.randn(50, device=device, requires_grad=True)
    targets = torch.zeros(shape, dtype=torch.int64, device=device)
    logp, ent = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    assert logp.shape == shape and ent.shape == shape and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_zero_gradients(backend, device):
    """No chunk runs, so no GEMM writes the (poisoned) weight-gradient buffer: it must still come back zero."""
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    targets = torch.full((6,), -100, dtype=torch.int64, device=device)
    logp = fused_linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp))
    (logp * torch.randn_like(logp)).sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


def _bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    meta_bias = torch.empty(10, device="meta")
    return [
        (dict(hidden=h.numpy()), TypeError, "hidden"),
        (dict(hidden=h.long()), TypeError, "hidden"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden"),
        (dict(weight=w.half()), TypeError, "weight"),
        (dict(weight=w[0]), ValueError, "weight"),
        (dict(weight=torch.randn(10, 9)), ValueError, "hidden, weight"),
        (dict(weight=torch.randn(0, 8), targets=torch.full((4,), -100)), ValueError, "weight"),
        (dict(hidden=torch.randn(4, 0), weight=torch.randn(10, 0)), ValueError, "hidden"),
        (dict(bias=torch.randn(10).half()), TypeError, "bias"),
        (dict(bias=torch.randn(11)), ValueError, "bias"),
        (dict(bias=meta_bias), ValueError, "bias"),
        (dict(targets=t.float()), TypeError, "targets"),
        (dict(targets=t[:3]), ValueError, "targets"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, "targets"),
        (dict(targets=torch.tensor([0, 1, -5, 2])), ValueError, "targets"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index"),
        (dict(return_entropy="yes"), TypeError, "return_entropy"),
        (dict(backend="gpu"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("override,error,name", _bad_inputs())
def test_bad_input_names_the_argument(override, error, name):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.randint(0, 10, (4,)))
    args.update(override)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(error, match=name):
        fused_linear_logprobs(hidden, weight, targets, **args)


def plain_torch_error_scale(hidden, weight, bias, targets, upstream, ref, dtype, *, temperature=1.0):
    """Tolerance scale per output (logp, entropy, grads) so that bound = max(REL_TOL, 2 x the error of plain torch
    in `dtype` (materialized logits, autograd)): sums over 2^18 terms cost fp32 ~sqrt(V) ulps in any order."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    plain = [logp, entropy, *(t.grad for t in leaves)]
    refs = [ref[0], ref[1], *ref[2]]
    return [max(1.0, 2 * rel_err(p, r) / REL_TOL[dtype]) for p, r in zip(plain, refs, strict=True)]


def compare_scaled(got, ref, scales, dtype):
    for name, g, r, scale in zip(("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"),
                                 [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], scales, strict=True):
        assert_rel_close(g, r, dtype, name=name, scale=scale)


def test_large_vocabulary_torch_path(monkeypatch):
    """V > 2^18 (where non-fp32 accumulators were seen to drift) on the CPU path, three chunks of rows."""
    vocab = 2**18 + 3
    monkeypatch.setenv(flp.CHUNK_ENV_VAR, str(8 * 4 * vocab / 2**20))
    hidden, weight, bias, targets = make_inputs(torch.float32, "cpu", shape=(20,), H=16, V=vocab, bias=True,
                                                n_ignored=2)
    upstream = (torch.randn(20), torch.randn(20))
    ref = run_ref(hidden, weight, bias, targets, upstream, entropy=True)
    scales = plain_torch_error_scale(hidden, weight, bias, targets, upstream, ref, torch.float32)
    got = run_op(hidden, weight, bias, targets, upstream, backend="torch", entropy=True)
    # grad_hidden sums V products per element in one GEMM per chunk, whose summation order depends on the chunk's
    # row count (CPU GEMMs sum sequentially for some M): allow sqrt(V) half-ulps, the random-walk bound.
    scales[2] = max(scales[2], vocab**0.5 * 2**-24 / REL_TOL[torch.float32])
    compare_scaled(got, ref, scales, torch.float32)


# Peak memory of one forward+backward, measured in a fresh process: the resident-set high-water mark (VmHWM, reset
# through /proc/self/clear_refs just before the call; ru_maxrss would carry the forking parent's size across exec)
# minus the resident set before the call. glibc's default malloc raises its mmap threshold after the first free and
# then keeps freed multi-MiB blocks in a fragmenting heap, so the RSS would measure the allocator's retention rather
# than what the op holds: a fixed threshold makes every large block an mmap that is returned on free.
_MEMORY_PROBE = textwrap.dedent(
    r"""
    import re, sys
    import torch
    from remax_kernels import fused_linear_logprobs

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024

    def materialized(hidden, weight, targets):
        return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    def fused(hidden, weight, targets):
        return fused_linear_logprobs(hidden, weight, targets, backend="torch")

    def inputs(n, v, h):
        hidden = torch.randn(n, h).requires_grad_()
        weight = (torch.randn(v, h) * 0.1).requires_grad_()
        return hidden, weight, torch.randint(0, v, (n,)), torch.randn(n)

    fn = {"fused": fused, "materialized": materialized}[sys.argv[1]]
    n, v, h = (int(x) for x in sys.argv[2:5])
    hidden, weight, targets, upstream = inputs(8, 64, h)  # warm-up: thread pools and kernels before the baseline
    (fn(hidden, weight, targets) * upstream).sum().backward()
    hidden, weight, targets, upstream = inputs(n, v, h)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    (fn(hidden, weight, targets) * upstream).sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    print(status_bytes("VmHWM") - before)
    """
)


def _peak_bytes(which: str, n: int, v: int, h: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, which, str(n), str(v), str(h)], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_torch_path_memory_is_far_below_the_logits():
    """N=2048, V=32768, H=64 fp32: the logits would be 256 MiB. The chunked path must stay under 40% of that over
    forward AND backward, while the same probe sees a materializing implementation exceed it (so it can fail)."""
    n, v, h = 2048, 32768, 64
    logits_bytes = n * v * 4
    fused = _peak_bytes("fused", n, v, h)
    materialized = _peak_bytes("materialized", n, v, h)
    assert materialized > logits_bytes, f"probe too weak: a materializing run peaked at {materialized / 2**20:.0f} MiB"
    assert fused < 0.4 * logits_bytes, f"fused peak {fused / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ GPU-only sizes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [50257, 2**18 + 3])
def test_gpu_realistic_vocabulary(V, dtype):
    """Real vocabulary sizes on the GPU: many vocabulary splits picked from the SM count, ragged everywhere.
    Tolerance: max(REL_TOL, 2x the error of plain torch in the same dtype)."""
    hidden, weight, bias, targets = make_inputs(dtype, "cuda", shape=(3, 171), H=320, V=V, bias=True, n_ignored=40)
    upstream = (torch.randn(targets.shape, device="cuda"), torch.randn(targets.shape, device="cuda"))
    opts = dict(temperature=0.9, entropy=True)
    ref = run_ref(hidden, weight, bias, targets, upstream, **opts)
    scales = plain_torch_error_scale(hidden, weight, bias, targets, upstream, ref, dtype, temperature=0.9)
    got = run_op(hidden, weight, bias, targets, upstream, backend="triton", **opts)
    compare_scaled(got, ref, scales, dtype)
    again = run_op(hidden, weight, bias, targets, upstream, backend="triton", **opts)
    for a, b in zip([got[0], got[1], *got[2]], [again[0], again[1], *again[2]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_token_logprobs_on_materialized_logits(backend, device):
    """The two public log-prob ops are one function of the logits: fused == token_logprobs(h @ W.T + b)."""
    from remax_kernels import token_logprobs

    hidden = torch.randn(29, 48, device=device, requires_grad=True)
    weight = (torch.randn(131, 48, device=device) / 7).requires_grad_()
    bias = torch.randn(131, device=device, requires_grad=True)
    targets = torch.randint(0, 131, (29,), device=device)
    targets[3] = -100
    upstream = torch.randn(29, device=device), torch.randn(29, device=device)

    fused = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True,
                                  backend=backend)
    grads_fused = torch.autograd.grad(fused[0] @ upstream[0] + fused[1] @ upstream[1], (hidden, weight, bias))
    logits = hidden @ weight.T + bias
    plain = token_logprobs(logits, targets, temperature=0.8, return_entropy=True, backend=backend)
    grads_plain = torch.autograd.grad(plain[0] @ upstream[0] + plain[1] @ upstream[1], (hidden, weight, bias))

    for name, a, b in zip(("logprobs", "entropy"), fused, plain, strict=True):
        assert_rel_close(a, b, torch.float32, name=name, scale=10)
    for name, a, b in zip(("hidden", "weight", "bias"), grads_fused, grads_plain, strict=True):
        assert_rel_close(a, b, torch.float32, name=f"grad {name}", scale=10)
