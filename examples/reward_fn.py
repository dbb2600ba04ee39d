"""An example reward for ``--reward examples/reward_fn.py:length_and_keyword_reward``.

A reward callable takes the prompts and the decoded responses (lists of strings, chat template not included) and
returns one float per response, as a tensor ``[B]`` or a list. Add ``prompt_ids`` / ``response_ids`` keyword
parameters to also receive the token ids.
"""

from __future__ import annotations

import torch


def length_and_keyword_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """+1 when the response mentions a word of the prompt, minus a small penalty per character beyond 200."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        words = {w.lower().strip(".,?!") for w in prompt.split() if len(w) > 3}
        hit = any(w in response.lower() for w in words)
        scores.append(float(hit) - 0.002 * max(0, len(response) - 200))
    return torch.tensor(scores)
