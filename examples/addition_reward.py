"""The reward of ``examples/smollm2_addition.yaml``: 1 when the answer to "What is a plus b?" is a + b, else 0.

The answer is the number after the last "=" when the response has one ("12 + 7 = 19"), else its last number.
"""

from __future__ import annotations

import re

import torch

_QUESTION = re.compile(r"What is (-?\d+) plus (-?\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def answer(response: str) -> int | None:
    """The number a response gives as its answer, or ``None`` when it holds no number."""
    _, equals, after = response.rpartition("=")
    numbers = _NUMBER.findall(after if equals else response)
    if not numbers:
        return None
    return int(numbers[0] if equals else numbers[-1])


def addition(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """``[B]`` float32: 1.0 where the response's answer equals the prompt's a + b."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        question = _QUESTION.search(prompt)
        if question is None:
            raise ValueError(f"addition: prompt {prompt!r} is not 'What is a plus b? ...'")
        scores.append(float(answer(response) == int(question[1]) + int(question[2])))
    return torch.tensor(scores)
