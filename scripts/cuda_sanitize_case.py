"""A small case of every CUDA kernel of csrc/, for compute-sanitizer (scripts/gpu_check.sh runs it under memcheck,
racecheck and synccheck, checking only the kernels whose names contain "remax").

Each launch configuration and code path is run once on small inputs: the row pass with a warp per row, a 256- and a
512-thread block per row, rows off 16-byte boundaries, in-place and out-of-place backward; the sampler without
truncation, with every candidate in shared memory, with only the threshold bins gathered, and on the key-histogram
fallback (more duplicates than the shared list holds), raw log-probs, invalid rows. Results are not checked here
(tests/test_cuda_kernels.py does); the exit status is 0 unless a launch fails.

    compute-sanitizer --tool racecheck --kernel-name kns=remax python scripts/cuda_sanitize_case.py
"""

from __future__ import annotations

import math

import torch

from remax_kernels import _cuda
from remax_kernels.ops.sampling import parse_options


def row_cases(device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    for vocab, dtype in [(1003, torch.bfloat16), (5001, torch.float16), (20000, torch.float32)]:
        base = torch.randn(3, 5, vocab, device=device, generator=g).to(dtype) * 3
        view = base[:, :-1]  # rows T * V apart, off 16-byte boundaries for odd V
        targets = torch.randint(0, vocab, (3, 4), device=device, generator=g)
        targets[0, 1] = -100
        logp, row_max, log_norm, entropy = _cuda.row_logprobs_forward(view, targets, 1 / 0.7, -100, True)
        g_lp = torch.randn(12, device=device, generator=g)
        g_ent = torch.randn(12, device=device, generator=g)
        out = torch.empty(3, 4, vocab, device=device, dtype=dtype)
        _cuda.row_logprobs_backward(view, targets, row_max, log_norm, entropy, g_lp, g_ent, 1 / 0.7, -100, out)
        _cuda.row_logprobs_backward(view, targets, row_max, log_norm, None, g_lp, None, 1 / 0.7, -100, view)


def sample_cases(device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    vocab = 20000
    logits = torch.randn(6, vocab, device=device, generator=g) * 3
    logits[1, :5000] = logits[1].max() + 1  # duplicates beyond the shared list: fallback search
    logits[4, 7] = math.nan
    greedy = torch.tensor([True, False, False, False, False, False], device=device)
    configs = [dict(), dict(top_k=50), dict(top_p=0.9), dict(top_k=10, top_p=0.5, min_p=0.01), dict(min_p=0.05)]
    for opts in configs:
        for raw, dtype in [(False, torch.bfloat16), (True, torch.float32)]:
            temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
                6, vocab, device, greedy, opts.get("temperature", 0.8), opts.get("top_k", 0), opts.get("top_p", 1.0),
                opts.get("min_p", 0.0), 1234, "raw" if raw else "processed",
            )
            _cuda.sample_and_greedy(logits.to(dtype), greedy_mask, temp, k, p, log_min_p, seeds, 7, key_row,
                                    truncate, raw)


def main() -> None:
    device = torch.device("cuda")
    _cuda.require(device, "cuda_sanitize_case")
    row_cases(device)
    sample_cases(device)
    torch.cuda.synchronize()
    print("cuda_sanitize_case: every kernel ran")


if __name__ == "__main__":
    main()
