"""Every public op is a torch.library op that torch.compile and CUDA graphs can hold as one node: its schema, fake
implementation and autograd registration pass ``torch.library.opcheck``; ``torch.compile(fullgraph=True)`` of a
function calling it (no graph break allowed) equals eager, forward and backward; under autocast the lm-head ops
run their GEMMs in the autocast dtype."""

from __future__ import annotations

import pytest
import torch

import remax_kernels as rk
from tests.helpers import assert_rel_close

# The interpreter evaluates masked-off lanes too and numpy warns about them; values are compared below.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ("triton", "torch")


def _lm_head_inputs(device, *, B=3, T=5, H=24, V=67):
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) * H**-0.5
    bias = torch.randn(V, device=device) * 0.1
    targets = torch.randint(0, V, (B, T), device=device)
    mask = torch.rand(B, T, device=device) < 0.7
    mask[0, 0] = True
    return hidden, weight, bias, targets, mask


def _opcheck_cases(device, backend):
    hidden, weight, bias, targets, mask = _lm_head_inputs(device)
    n, h = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
    flat_h, flat_t = hidden.reshape(n, h).requires_grad_(), targets.reshape(-1).masked_fill(~mask.reshape(-1), -100)
    logits = torch.randn(n, 67, device=device, requires_grad=True)
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    ops = torch.ops.remax_kernels
    return [
        (ops.token_logprobs.default, (logits, flat_t, 0.9, -100, True, backend)),
        (ops.token_logprobs_inplace_backward.default, (logits, flat_t, 1.0, -100, False, backend)),
        (ops.fused_linear_logprobs.default, (flat_h, w, b, flat_t, -100, 0.8, True, torch.float32, backend)),
        (ops.fused_linear_policy_loss.default,
         (flat_h, w, b, flat_t, torch.rand(n, device=device), torch.randn(n, device=device),
          torch.randn(n, device=device) - 3, torch.randn(n, device=device) - 3, torch.randn(n, device=device) - 3,
          1.0, 0.2, 0.28, 3.0, 0.1, "k3", 0.01, 2.0, torch.float32, backend, True, True, True)),
    ]


def _sampling_opcheck_cases(device, backend):
    from remax_kernels.ops.sampling import parse_options, step_tensor

    logits = 3 * torch.randn(6, 67, device=device)
    greedy = torch.arange(6, device=device) % 2 == 0
    parsed = parse_options(6, 67, device, greedy, 0.8, 5, 0.9, 0.01, torch.arange(6, device=device), "processed")
    temp, k, p, log_min_p, seeds, greedy, key_row, truncate = parsed
    step = step_tensor(3, device)
    hidden, weight = torch.randn(6, 24, device=device), torch.randn(67, 24, device=device) / 5
    ops = torch.ops.remax_kernels
    return [
        (ops.sample_and_greedy.default,
         (logits, greedy, temp, k, p, log_min_p, seeds, key_row, step, truncate, False, backend)),
        (ops.fused_linear_sample_and_greedy.default,
         (hidden, weight, None, greedy, temp, seeds, key_row, step, True, backend)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(2))
def test_opcheck_sampling(case, backend, device):
    op, args = _sampling_opcheck_cases(device, backend)[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_ops_compile_without_graph_breaks_with_the_step_as_a_tensor(backend, device):
    """A decode step with the step as a device tensor: one graph for every step (no recompilation per step)."""
    logits = 3 * torch.randn(6, 67, device=device)
    hidden, weight = torch.randn(6, 24, device=device), torch.randn(67, 24, device=device) / 5
    greedy = torch.arange(6, device=device) % 2 == 0
    seeds = torch.arange(6, device=device) + 100

    def fn(x, h, step):
        tokens, logp = rk.sample_and_greedy(x, greedy, temperature=0.8, top_k=20, top_p=0.9, seed=seeds, step=step,
                                            backend=backend)
        tokens2, logp2 = rk.fused_linear_sample_and_greedy(h, weight, greedy, temperature=0.8, seed=seeds,
                                                           step=step, backend=backend)
        return tokens, logp, tokens2, logp2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            step_t = torch.full((1,), step, dtype=torch.int64, device=device)
            for a, b in zip(compiled(logits, hidden, step_t), fn(logits, hidden, step), strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(4))
def test_opcheck(case, backend, device):
    """Schema (no hidden mutation or aliasing), fake tensors, autograd registration and AOT dispatch."""
    op, args = _opcheck_cases(device, backend)[case]
    # The loss op's outputs besides the loss are not differentiable by design (gradients computed in the forward).
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if op is not torch.ops.remax_kernels.fused_linear_policy_loss.default:
        tests += ("test_autograd_registration",)
    torch.library.opcheck(op, args, test_utils=tests)


def _compare(fn, args, grad_args, *, backend_compile="aot_eager"):
    """``fn`` eager vs ``torch.compile(fn, fullgraph=True)``: outputs and gradients w.r.t. ``grad_args`` indices."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=backend_compile)):
        leaves = [a.detach().clone().requires_grad_() if i in grad_args else a for i, a in enumerate(args)]
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs[0], [leaves[i] for i in grad_args])
        results.append(([o.detach() for o in outs], grads))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    for a, b in zip(eager_out + list(eager_grads), compiled_out + list(compiled_grads), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_compiles_without_graph_breaks(backend, device):
    logits = torch.randn(3, 6, 67, device=device)
    targets = torch.randint(0, 67, (3, 6), device=device)
    targets[1, 2] = -100
    g = torch.randn(3, 5, device=device)

    def fn(x, t):
        logp, entropy = rk.token_logprobs(x[:, :-1], t[:, 1:], temperature=0.7, return_entropy=True, backend=backend)
        return (logp * g).sum() + entropy.sum(), logp

    _compare(fn, (logits, targets), grad_args=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_compiles_without_graph_breaks(backend, device):
    hidden, weight, bias, targets, mask = _lm_head_inputs(device)
    targets = targets.masked_fill(~mask, -100)

    def fn(h, w, b, t):
        logp, entropy = rk.fused_linear_logprobs(h, w, t, bias=b, temperature=1.3, return_entropy=True,
                                                 backend=backend)
        return (logp * 2).sum() - entropy.sum(), logp

    _compare(fn, (hidden, weight, bias, targets), grad_args=(0, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_policy_loss_compiles_without_graph_breaks(backend, device):
    hidden, weight, bias, targets, mask = _lm_head_inputs(device)
    adv = torch.randn(hidden.shape[0], device=device)
    old = torch.randn(targets.shape, device=device) - 4
    ref = torch.randn(targets.shape, device=device) - 4
    options = rk.LossOptions(clip_ratio=(0.2, 0.28), kl_coef=0.05, entropy_coef=0.01,
                             loss_agg_mode="seq-mean-token-mean")

    def fn(h, w, b):
        loss, metrics = rk.fused_linear_policy_loss(h, w, targets, adv, mask, bias=b, old_logprobs=old,
                                                    ref_logprobs=ref, options=options, backend=backend)
        return loss, metrics["kl"], metrics["entropy"], metrics["clip_frac"]

    _compare(fn, (hidden, weight, bias), grad_args=(0, 1, 2))


def test_policy_loss_compiles_without_graph_breaks(device):
    logp = torch.randn(4, 6, device=device) - 2
    mask = torch.rand(4, 6, device=device) < 0.8
    adv = torch.randn(4, device=device)
    ref = logp - 0.3 * torch.rand(4, 6, device=device)

    def fn(lp):
        loss, metrics = rk.policy_loss(lp, adv, mask, old_logprobs=lp.detach() + 0.1, clip_ratio=0.2,
                                       ref_logprobs=ref, kl_coef=0.1, kl_estimator="k3")
        return loss, metrics["pg_loss"], metrics["kl"]

    _compare(fn, (logp,), grad_args=(0,))


def test_inductor_compiles_the_fused_loss(device):
    """The default backend (Inductor) too, around the op: the wrapper's masks and metrics become generated code."""
    hidden, weight, bias, targets, mask = _lm_head_inputs(device)
    adv = torch.randn(hidden.shape[0], device=device)

    def fn(h, w):
        loss, metrics = rk.fused_linear_policy_loss(h, w, targets, adv, mask)
        return loss, metrics["logprob_mean"]

    _compare(fn, (hidden, weight), grad_args=(0, 1), backend_compile="inductor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_lm_head_in_the_autocast_dtype(backend, device):
    """fp32 hidden and weight under autocast(bf16) give what bf16 inputs give without autocast (the GEMMs run in
    bf16); the gradients come back in the inputs' fp32."""
    hidden, weight, bias, targets, mask = _lm_head_inputs(device)
    adv = torch.randn(hidden.shape[0], device=device)
    fns = {
        "logprobs": lambda h, w: rk.fused_linear_logprobs(h, w, targets, backend=backend).sum(),
        "loss": lambda h, w: rk.fused_linear_policy_loss(h, w, targets, adv, mask, backend=backend)[0],
    }
    for name, fn in fns.items():
        h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(h32, w32)
        out.backward()
        h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
        expected = fn(h16, w16)
        expected.backward()
        assert h32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32, name
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # Same bf16 products; the fp32 gradients skip the final rounding to bf16.
        assert_rel_close(h32.grad, h16.grad.float(), torch.bfloat16, name=f"{name}: grad hidden")
        assert_rel_close(w32.grad, w16.grad.float(), torch.bfloat16, name=f"{name}: grad weight")
        # And bf16 really was used: fp32 GEMMs give a visibly different value.
        assert not torch.equal(out, fn(hidden, weight)), name


def _device_syncs(fn) -> int:
    """How many synchronizing CUDA calls ``fn`` makes (torch's sync debug mode warns once per call)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_hot_path_syncs_with_the_host_at_most_once_per_call():
    """token_logprobs and the sampling ops never wait for the GPU; the lm-head ops once per forward and once per
    backward (counting the response rows), whatever the value checks would have read."""
    device = torch.device("cuda")
    hidden, weight, bias, targets, mask = _lm_head_inputs(device, H=64, V=1000)
    hidden.requires_grad_()
    logits = torch.randn(8, 1000, device=device, requires_grad=True)
    greedy = torch.arange(8, device=device) % 2 == 0
    adv = torch.randn(hidden.shape[0], device=device)
    token = lambda: rk.token_logprobs(logits, targets.reshape(-1)[:8], return_entropy=True)[0].sum().backward()
    assert _device_syncs(token) == 0
    assert _device_syncs(lambda: rk.sample_and_greedy(logits.detach(), greedy, top_p=0.9, top_k=50, seed=1)) == 0
    assert _device_syncs(lambda: rk.fused_linear_sample_and_greedy(hidden[:, 0].detach(), weight, greedy[:3])) == 0
    loss = {}
    assert _device_syncs(lambda: loss.setdefault("v", rk.fused_linear_policy_loss(hidden, weight, targets, adv,
                                                                                   mask)[0])) == 1
    assert _device_syncs(lambda: loss["v"].backward()) == 0
    logp = {}
    assert _device_syncs(lambda: logp.setdefault("v", rk.fused_linear_logprobs(hidden, weight, targets))) == 1
    assert _device_syncs(lambda: logp["v"].sum().backward()) == 1
