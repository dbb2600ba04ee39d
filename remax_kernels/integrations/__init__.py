"""Integrations of remax-kernels into other trainers.

- ``remax_kernels.integrations.trl``: Hugging Face TRL. ``ReMaxTrainer`` / ``ReMaxConfig`` (ReMax as a TRL trainer)
  and ``use_remax_kernels(trainer)`` (the fused log-prob and loss kernels inside TRL's own GRPO and RLOO trainers).
  Needs the optional extra: ``pip install "remax-kernels[trl]"``.

Nothing is imported here: importing ``remax_kernels.integrations`` never imports (or patches) a trainer library.
"""

from __future__ import annotations
