"""Write ``addition_prompts.jsonl``: the 400 prompts "What is a plus b? Reply with just the number." for a, b in
1..20, in a fixed shuffled order (the run holds out the last ``eval_size`` of them).

    python examples/make_addition_prompts.py            # rewrites examples/addition_prompts.jsonl (committed)
"""

from __future__ import annotations

import json
import os
import random

PROMPT = "What is {a} plus {b}? Reply with just the number."


def addition_prompts(*, low: int = 1, high: int = 20, seed: int = 0) -> list[str]:
    """Every pair (a, b) with ``low <= a, b <= high`` as a prompt, shuffled with ``random.Random(seed)``."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(seed).shuffle(pairs)
    return [PROMPT.format(a=a, b=b) for a, b in pairs]


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "addition_prompts.jsonl")
    with open(path, "w") as fh:
        for prompt in addition_prompts():
            fh.write(json.dumps({"prompt": prompt}) + "\n")
    print(path)
