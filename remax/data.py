"""Prompts and the embedded experiment's pieces: a character tokenizer built in code, the addition task and its
partial-credit reward, imperfect warm-start demonstrations, and JSONL prompt loading with chat templates.

The built-in task: prompts ``"057+068="``, answers ``"0125"``: operands zero-padded to ``digits`` digits, the sum to
``digits + 1`` (fixed widths let a 2-layer model learn the task in seconds). The reward is 1 for the exact sum and
otherwise partial credit: the fraction of digits that match the sum's, aligned on the right. The warm-start
demonstrations drop the carry in a chosen fraction of the carrying problems (``057+068=0015``), so the supervised
model makes a plausible, systematic mistake that a policy gradient can fix.
"""

from __future__ import annotations

import json
import random

import torch

TASK_CHARS = "0123456789+="
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(chars: str = TASK_CHARS):
    """A character-level Hugging Face fast tokenizer built in code (nothing is downloaded).

    One token per character of ``chars`` plus ``<pad>``, ``<bos>`` (prepended to every encoded text), ``<eos>`` and
    ``<unk>``; pads on the left (prompts for generation); decodes without spaces.

    Example::

        >>> tok = build_char_tokenizer()
        >>> tok("12+3=").input_ids
        [1, 5, 6, 14, 7, 15]
        >>> tok.decode([5, 6, 2], skip_special_tokens=True)
        '12'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + list(chars))}
    if len(vocab) != len(SPECIAL_TOKENS) + len(chars):
        raise ValueError(f"chars: {chars!r} has duplicates or collides with the special tokens")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", truncation_side="left",
    )


# --- the addition task ------------------------------------------------------------------------------------------


def carry_dropped_sum(a: int, b: int) -> int:
    """The sum computed digit by digit without carrying (the demonstrations' systematic mistake)."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def addition_problems(n: int, *, digits: int, seed: int, exclude: set | None = None) -> list[tuple[int, int]]:
    """``n`` distinct ``(a, b)`` pairs not in ``exclude``, drawn with ``random.Random(seed)``."""
    space = (10**digits) ** 2
    if n + len(exclude or ()) > space:
        raise ValueError(f"task.train_size: asked for {n} distinct problems but only {space} exist")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        pair = (rng.randrange(10**digits), rng.randrange(10**digits))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def addition_prompt(a: int, b: int, digits: int) -> str:
    return f"{a:0{digits}d}+{b:0{digits}d}="


def addition_answer(total: int, digits: int) -> str:
    """Fixed width (``digits + 1``, zero-padded): each answer position has one job, which a tiny model learns fast."""
    return f"{total:0{digits + 1}d}"


def addition_demonstrations(
    problems: list[tuple[int, int]], *, digits: int, error_rate: float, seed: int
) -> tuple[list[str], list[str]]:
    """Prompts and imperfect answers: a carrying problem is answered without the carry with prob. ``error_rate``."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for a, b in problems:
        wrong = carry_dropped_sum(a, b)
        answer = wrong if wrong != a + b and rng.random() < error_rate else a + b
        prompts.append(addition_prompt(a, b, digits))
        answers.append(addition_answer(answer, digits))
    return prompts, answers


def addition_score(prompt: str, response: str) -> float:
    """Partial credit in [0, 1]: 1 only for the exact sum; else matching right-aligned digits / the longer length."""
    lhs = prompt.rsplit("=", 1)[0].rsplit("\n", 1)[-1]
    a, _, b = lhs.partition("+")
    target = addition_answer(int(a) + int(b), max(len(a), len(b)))
    answer = response.strip()
    if not answer.isdigit():
        return 0.0
    if answer == target:
        return 1.0
    matches = sum(x == y for x, y in zip(reversed(answer), reversed(target), strict=False))
    return matches / max(len(answer), len(target))


def addition_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Reward function of the built-in task: ``addition_score`` per pair, as a float32 tensor ``[B]``.

    Usable as ``--reward remax.data:addition_reward``.

    Example::

        >>> addition_reward(["057+068=", "057+068=", "001+002="], ["0125", "0015", "x"])
        tensor([1.0000, 0.5000, 0.0000])
    """
    return torch.tensor([addition_score(p, r) for p, r in zip(prompts, responses, strict=True)], dtype=torch.float32)


def addition_task(*, digits: int, train_size: int, eval_size: int, error_rate: float, seed: int) -> dict:
    """The built-in experiment's data: train/held-out prompts (disjoint) and imperfect demonstrations."""
    held_out = addition_problems(eval_size, digits=digits, seed=seed + 1)
    train = addition_problems(train_size, digits=digits, seed=seed + 2, exclude=set(held_out))
    demo_prompts, demo_answers = addition_demonstrations(train, digits=digits, error_rate=error_rate, seed=seed + 3)
    return {
        "train_prompts": [addition_prompt(a, b, digits) for a, b in train],
        "eval_prompts": [addition_prompt(a, b, digits) for a, b in held_out],
        "demo_prompts": demo_prompts,
        "demo_answers": demo_answers,
        "reward_fn": addition_reward,
    }


# --- prompts from files -----------------------------------------------------------------------------------------


def load_jsonl_prompts(path: str, *, field: str = "prompt") -> list[str]:
    """The ``field`` string of every line of a JSONL file; errors name the file and line."""
    prompts = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"prompts: {path}:{lineno} is not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"prompt_field: {path}:{lineno} has no field {field!r}")
            if not isinstance(record[field], str) or not record[field]:
                raise ValueError(f"prompt_field: {path}:{lineno} field {field!r} is not a non-empty string")
            prompts.append(record[field])
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompts")
    return prompts


def format_prompts(tokenizer, prompts: list[str], *, chat_template: bool = True) -> list[str]:
    """Wrap each prompt as a user turn of the tokenizer's chat template (when it has one and ``chat_template``)."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def tokenize_prompts(
    tokenizer, texts: list[str], *, max_length: int, templated: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` ``[B, P]`` int64, truncated from the left to ``max_length``.

    Chat templates already contain their special tokens, so ``templated`` texts are encoded without adding more.
    """
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=not templated,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()
