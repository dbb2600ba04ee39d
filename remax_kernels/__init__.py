"""remax-kernels: fused kernels for ReMax RLHF.

Public API (flat):
- log-probs: ``token_logprobs``, ``fused_linear_logprobs``
- losses: ``policy_loss``, ``fused_linear_policy_loss``, ``ReMaxLoss``, their options ``LossOptions``
- advantages: ``remax_advantages``, ``reinforce_advantages``, ``rloo_advantages``, ``grpo_advantages``
- decoding: ``sample_and_greedy``, ``fused_linear_sample_and_greedy``, ``generate_pairs``, ``PairedRollout``,
  ``generate_samples``, ``SampledRollout``
- Hugging Face helpers: ``remax_kernels.hf``

Every op picks its implementation in ``remax_kernels._dispatch`` (CUDA -> Triton, CPU -> torch, CPU with
``TRITON_INTERPRET=1`` -> Triton interpreter); pass ``backend="torch"``/``"triton"`` or set
``REMAX_KERNELS_BACKEND`` to override.
"""

from __future__ import annotations

from remax_kernels.advantages import grpo_advantages, reinforce_advantages, remax_advantages, rloo_advantages
from remax_kernels.generation import PairedRollout, SampledRollout, generate_pairs, generate_samples
from remax_kernels.losses import LossOptions, ReMaxLoss, fused_linear_policy_loss, policy_loss
from remax_kernels.ops.fused_linear_logprobs import fused_linear_logprobs
from remax_kernels.ops.sampling import fused_linear_sample_and_greedy, sample_and_greedy
from remax_kernels.ops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = [
    "LossOptions",
    "PairedRollout",
    "ReMaxLoss",
    "SampledRollout",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_linear_sample_and_greedy",
    "generate_pairs",
    "generate_samples",
    "grpo_advantages",
    "policy_loss",
    "reinforce_advantages",
    "remax_advantages",
    "rloo_advantages",
    "sample_and_greedy",
    "token_logprobs",
]
