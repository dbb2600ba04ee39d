"""remax: a small ReMax RLHF trainer on top of remax_kernels.

Command line: ``remax train | eval | plot | compare`` (see ``remax.cli``). Python::

    from remax import Trainer, TrainConfig
    trainer = Trainer(policy, tokenizer, reward_fn, config=TrainConfig(model="path/to/model"), prompts=[...])
    summary = trainer.train()   # quiet=True for no progress bar and no messages; they go to logging "remax"
"""

from __future__ import annotations

from remax.config import TaskConfig, TrainConfig, load_config
from remax.trainer import Trainer

__all__ = ["TaskConfig", "TrainConfig", "Trainer", "load_config"]
