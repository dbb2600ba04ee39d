"""Input checks shared by the public ops. Each raises TypeError/ValueError with a message naming the argument.

Shapes, dtypes and devices are metadata: they are always checked, on the host, at no cost. Checks of VALUES
(targets in range, finite advantages, ...) would read device memory, i.e. stall the GPU until the host has the
answer, so on CUDA they run only when ``REMAX_KERNELS_CHECKS=1`` (read at call time; use it while debugging).
On CPU tensors the values are already on the host and the checks always run. The ops run their value checks
inside their ``torch.library`` implementation, so ``torch.compile`` traces the public functions without a break.
"""

from __future__ import annotations

import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, t, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype must be one of {allowed}, got {str(t.dtype).replace('torch.', '')}")
    return t


def check_index(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: dtype must be int64 or int32, got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None entries ignored) must be on one device; returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{n}: is on {t.device} but {named[0][0]} is on {device}; move them to one device")
    return device


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


CHECKS_ENV_VAR = "REMAX_KERNELS_CHECKS"


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on ``device`` (see the module docstring). Never
    while ``torch.compile`` traces: the ops run their checks at run time, inside their implementations."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cpu":
        return True
    return os.environ.get(CHECKS_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def check_targets(name: str, targets: torch.Tensor, vocab_size: int, ignore_index: int | None, *,
                  where: str | None = None) -> None:
    """Every target is in [0, vocab_size) or equals ignore_index (None: no exception). Reads the values: one device
    sync on CUDA, so callers guard it with ``value_checks_enabled``. ``where`` names the checked targets in the
    messages (default: those other than ``ignore_index``)."""
    if targets.numel() == 0:
        return
    valid = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    bad_high = (targets >= vocab_size) & valid
    bad_low = (targets < 0) & valid
    n_high, n_low = int(bad_high.sum()), int(bad_low.sum())
    if n_high:
        top = int(targets[bad_high].max())
        at = "" if where is None else f" {where}"
        raise ValueError(f"{name}: {n_high} values >= vocab size {vocab_size}{at} (max {top})")
    if n_low:
        low = int(targets[bad_low].min())
        at = where if where is not None else "" if ignore_index is None else f"other than ignore_index={ignore_index}"
        raise ValueError(f"{name}: {n_low} negative values {at} (min {low})".replace("  ", " "))


def check_token_ids(name: str, ids: torch.Tensor, model: torch.nn.Module) -> None:
    """Every id indexes the model's input embeddings (an out-of-range id is a device-side assert on CUDA, an
    IndexError deep in torch on CPU). Reads the values: guard with ``value_checks_enabled``."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if vocab_size is not None:
        check_targets(name, ids, vocab_size, None, where="(the model's input embeddings)")


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> None:
    """``attention_mask`` is an integer/bool tensor shaped and placed like ``input_ids`` (values are not read)."""
    check_tensor("attention_mask", attention_mask)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask: expected an integer or bool tensor of 0/1, got {attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask: is on {attention_mask.device} but input_ids is on {input_ids.device}")


def check_number(name: str, value) -> float:
    """A Python (or NumPy) real number as a float; tensors are refused (reading one would sync the GPU)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a Python float here, got a tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_temperature(name: str, temperature) -> float:
    t = check_number(name, temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"{name}: must be a finite number > 0, got {temperature!r}")
    return t


def check_softcap(name: str, softcap) -> float:
    """Logit soft-capping ``z -> softcap * tanh(z / softcap)``: None (off) or a finite number > 0. Returns the cap as
    the ops pass it to their kernels, 0.0 meaning off."""
    if softcap is None:
        return 0.0
    c = check_number(name, softcap)
    if not c > 0 or c == float("inf"):
        raise ValueError(f"{name}: must be None (no capping) or a finite number > 0, got {softcap!r}")
    return c
