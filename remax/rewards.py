"""Reward functions: a Python callable (``path/to/file.py:function`` or ``module:function``), or a local HF
sequence-classification model with one label.

Every reward the trainer calls goes through ``RewardFunction``, which checks the output (a float tensor ``[B]``,
finite) and raises one clear error naming the reward otherwise (``RewardError`` for bad values, naming the first bad
prompt and response; and for an exception the reward raises, naming it). ``probe`` calls it once on two prompts
before any heavy work, so a reward returning the wrong shape or NaN fails in seconds, not after the warm-start.

A callable reward has the signature ``fn(prompts: list[str], responses: list[str]) -> Tensor[B] | list[float]``; if
it also accepts ``prompt_ids`` / ``response_ids`` (or ``**kwargs``) it receives the token ids as lists of int lists.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

import torch

FORMS = "'path/to/file.py:function', 'module:function' or a local reward-model directory"


class RewardError(ValueError):
    """A reward returned a value the trainer cannot use (wrong shape, NaN/inf), or raised."""


class RewardFunction:
    """Validating wrapper: ``reward(prompts, responses, prompt_ids=None, response_ids=None) -> float32 [B]`` (CPU)."""

    def __init__(self, fn: Callable, *, name: str):
        if not callable(fn):
            raise TypeError(f"reward: {name} is not callable")
        self.fn = fn
        self.name = name
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            params = ()
        self._takes_ids = any(p.kind == p.VAR_KEYWORD or p.name in ("prompt_ids", "response_ids") for p in params)

    def __call__(self, prompts: list[str], responses: list[str], *, prompt_ids=None, response_ids=None) -> torch.Tensor:
        try:
            if self._takes_ids and prompt_ids is not None:
                out = self.fn(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)
            else:
                out = self.fn(prompts, responses)
        except Exception as err:
            # A reward that raises (a reward server going down) is treated as one that returns NaN: one line naming
            # it, and the trainer checkpoints its last finished step. KeyboardInterrupt is not an Exception.
            text = str(err).strip().splitlines()
            raise RewardError(f"reward: {self.name} raised {type(err).__name__}" + (f": {text[0]}" if text else "")
                              ) from err
        return check_reward_output(out, len(prompts), self.name, prompts=prompts, responses=responses)

    def probe(self, prompts: list[str], tokenizer=None) -> None:
        """Call once on (up to) two prompts with a dummy response "0" to check the output before heavy work.

        Token ids (for rewards that take them) come from ``tokenizer``; without one they are empty lists.
        """
        sample = list(prompts[:2])
        responses = ["0"] * len(sample)
        if tokenizer is not None:
            prompt_ids = [tokenizer(p).input_ids for p in sample]
            response_ids = [tokenizer(r, add_special_tokens=False).input_ids for r in responses]
        else:
            prompt_ids = response_ids = [[] for _ in sample]
        self(sample, responses, prompt_ids=prompt_ids, response_ids=response_ids)


def check_reward_output(out, batch: int, name: str, *, prompts: list[str] | None = None,
                        responses: list[str] | None = None) -> torch.Tensor:
    """``out`` as a float32 CPU tensor ``[batch]``; ``TypeError`` / ``RewardError`` naming the reward otherwise.

    ``prompts`` / ``responses`` (optional) let a NaN/inf error quote the first pair that produced one.
    """
    if isinstance(out, (list, tuple)):
        try:
            out = torch.tensor(out, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(f"reward: {name} returned a {type(out).__name__} that is not a list of numbers") from err
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"reward: {name} must return a float tensor [B] (or a list of floats), "
                        f"got {type(out).__name__}")
    if not (out.dtype.is_floating_point or out.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"reward: {name} returned dtype {out.dtype}; expected a float tensor [B]")
    if tuple(out.shape) != (batch,):
        # [B, 1] too: a column is usually a model's logits passed on unreduced; say so instead of guessing.
        hint = " (squeeze the last dimension)" if tuple(out.shape) == (batch, 1) else ""
        raise RewardError(f"reward: {name} returned shape {tuple(out.shape)} for {batch} responses; expected "
                          f"[{batch}]{hint}")
    out = out.detach().float().cpu()
    bad = ~torch.isfinite(out)
    if bad.any():
        first = int(bad.nonzero()[0])
        quoted = (f"; first: prompt {prompts[first][:60]!r}, response {responses[first][:60]!r}"
                  if prompts is not None and responses is not None else "")
        raise RewardError(f"reward: {name} returned {int(bad.sum())} NaN/inf value(s) out of {batch}{quoted}")
    return out


def import_callable(spec: str) -> Callable:
    """``"path/to/file.py:function"`` or ``"package.module:function"`` -> the function.

    A module is looked up in the current folder first, then on ``sys.path``: the ``remax`` console script, unlike
    ``python -m remax``, does not put the current folder on ``sys.path``.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward: {spec!r} is not one of {FORMS}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"reward: file {module_name!r} does not exist")
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    except ImportError as err:
        raise ValueError(f"reward: cannot import module {module_name!r} ({err}) from the current folder or "
                         f"sys.path; a file can be named by its path instead: 'path/to/file.py:{attr}'") from err
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"reward: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise TypeError(f"reward: {spec} is not callable")
    return fn


class SequenceClassifierReward:
    """Scores ``prompt + response`` texts with a local HF sequence-classification model with one label."""

    def __init__(self, path: str, *, device: torch.device, batch_size: int = 32, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"reward: cannot load a sequence-classification model from {path!r}: {first}") from None
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward: the model in {path!r} has {self.model.config.num_labels} labels; a reward model "
                             "scores each sequence with one number (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        self.tokenizer.truncation_side = "left"
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores)


def load_reward(spec: str | None, *, device: torch.device, default: Callable | None = None) -> RewardFunction:
    """Resolve ``config.reward``: None -> ``default`` (the task's reward), a directory -> ``SequenceClassifierReward``,
    else ``module:function``."""
    if spec is None:
        if default is None:
            raise ValueError(f"reward: no reward given; pass --reward as {FORMS}")
        return RewardFunction(default, name=f"{default.__module__}:{default.__name__}")
    if os.path.isdir(spec):
        return RewardFunction(SequenceClassifierReward(spec, device=device), name=spec)
    return RewardFunction(import_callable(spec), name=spec)
