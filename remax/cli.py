"""``remax`` command line: train, eval, plot, compare.

    remax train [--config FILE.yaml] [--key value ...]     ReMax on a local HF model, or the embedded experiment
    remax train --resume RUN_DIR [--key value ...]        continue a run from its latest complete checkpoint
    remax eval RUN_DIR | --model DIR ... [--key value]    greedy and sampled reward on the held-out prompts
    remax plot RUN_DIR                                    reward_curves.png from metrics.jsonl
    remax compare [--estimators remax,reinforce,rloo] [--config FILE] [--key value ...]

With no model (``remax train``), the embedded experiment runs: a tiny Llama and a character tokenizer built in
code learn 3-digit addition from imperfect demonstrations, then ReMax improves them; it prints the held-out greedy
and sampled reward before and after RL. Under ``torchrun --nproc_per_node N`` every subcommand that trains shards
the policy with FSDP2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

from remax.config import TrainConfig, load_config, parse_overrides

USAGE = __doc__


class UsageError(Exception):
    """A bad configuration or input found before training starts: reported in one line, without a traceback."""


def _setup_errors(fn):
    """Run a setup callable, turning its ValueError/TypeError (bad config, paths, reward) into a UsageError."""
    try:
        return fn()
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


def _log(info):
    return print if info.is_main else (lambda *a, **k: None)


def _default_run_dir(info, prefix: str = "") -> str:
    from remax.distributed import broadcast_object

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return broadcast_object(os.path.join("runs", f"{prefix}{stamp}"), info)


def build_experiment(config: TrainConfig, info, *, run_dir: str, log=print) -> dict:
    """Policy, tokenizer, reward, prompts (and reference) for ``config``, failing fast on bad inputs.

    With ``config.model`` None: the embedded experiment. Its warm-started policy is saved to
    ``RUN_DIR/initial_policy`` (rank 0) and reloaded from there on ``--resume``, so a resumed run's KL reference
    is the same model.
    """
    from remax.data import addition_task, build_char_tokenizer, load_jsonl_prompts
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
        policy = load_causal_lm(config.model, name="model", attn_implementation=attn)
        ref = (load_causal_lm(config.ref_model, name="ref_model", attn_implementation=attn)
               if config.ref_model and config.kl_coef > 0 else None)
        return dict(policy=policy, tokenizer=tokenizer, reward_fn=reward, ref_model=ref, prompts=prompts,
                    eval_prompts=eval_prompts)

    tokenizer = build_char_tokenizer()
    task = addition_task(digits=config.task_digits, train_size=config.task_train_size,
                         eval_size=config.eval_size, error_rate=config.demo_error_rate, seed=config.seed)
    reward = load_reward(config.reward, device=device, default=task["reward_fn"])
    reward.probe(task["train_prompts"], tokenizer)
    init_dir = os.path.join(run_dir, "initial_policy")
    if config.resume is not None and os.path.isdir(init_dir):
        policy = load_causal_lm(init_dir, name="initial_policy")
    else:
        policy = build_tiny_llama(tokenizer, config).to(device)
        if config.sft_steps:
            n_params = sum(p.numel() for p in policy.parameters())
            log(f"warm-start: {n_params / 1e3:.0f}k-parameter Llama, {config.sft_steps} supervised steps on "
                f"demonstrations that drop the carry {config.demo_error_rate:.0%} of the time")
            sft_warmstart(policy, tokenizer, task["demo_prompts"], task["demo_answers"], steps=config.sft_steps,
                          lr=config.sft_lr, batch_size=config.sft_batch_size, seed=config.seed, device=device,
                          log=log)
        broadcast_module(policy, info)
        if info.is_main:
            os.makedirs(run_dir, exist_ok=True)
            policy.save_pretrained(init_dir)
        barrier(info)
    return dict(policy=policy, tokenizer=tokenizer, reward_fn=reward, ref_model=None,
                prompts=task["train_prompts"], eval_prompts=task["eval_prompts"])


def _train_config(args) -> TrainConfig:
    overrides = parse_overrides(args.overrides)
    if "resume" in overrides and overrides["resume"] is not None:
        saved = os.path.join(overrides["resume"], "config.yaml")
        if not os.path.isfile(saved):
            raise ValueError(f"resume: {overrides['resume']!r} has no config.yaml (not a run directory)")
        base = load_config(saved).to_dict()
        if args.config:
            base.update(load_config(args.config).to_dict())
        base.update(overrides)
        base["run_dir"] = overrides["resume"]
        return TrainConfig.from_dict(base, source="--resume").with_task_defaults()
    return load_config(args.config, overrides).with_task_defaults()


def cmd_train(args) -> dict:
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.trainer import Trainer

    config = _setup_errors(lambda: _train_config(args))
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    try:
        log = _log(info)
        run_dir = config.run_dir or _default_run_dir(info)
        config = config.replace(run_dir=run_dir)
        t0 = time.perf_counter()

        def setup():
            from remax.checkpoint import latest_checkpoint

            if config.resume is None and latest_checkpoint(run_dir) is not None:
                raise ValueError(f"run_dir: {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                                 "or choose another run_dir")
            parts = build_experiment(config, info, run_dir=run_dir, log=log)
            return Trainer(parts.pop("policy"), parts.pop("tokenizer"), parts.pop("reward_fn"), config=config,
                           dist_info=info, log=log, **parts)

        trainer = _setup_errors(setup)
        summary = trainer.train()
        log(f"total wall time (warm-start + RL): {time.perf_counter() - t0:.1f} s")
        return summary
    finally:
        shutdown()


def _eval_config(args) -> tuple[TrainConfig, bool]:
    overrides = parse_overrides(args.overrides)
    embedded = False
    base = {}
    if args.run_dir is not None:
        saved = os.path.join(args.run_dir, "config.yaml")
        if not os.path.isfile(saved):
            raise ValueError(f"run_dir: {args.run_dir!r} has no config.yaml")
        saved_config = load_config(saved)
        base = saved_config.to_dict()
        if "model" not in overrides:
            final = os.path.join(args.run_dir, "final")
            if not os.path.isdir(final):
                raise ValueError(f"run_dir: {args.run_dir!r} has no final/ model (it is saved at the end of training)")
            embedded = saved_config.model is None
            base["model"] = final
            base["tokenizer"] = final if embedded else (saved_config.tokenizer or saved_config.model)
    base.update(overrides)
    base.update(kl_coef=0.0, resume=None, run_dir=None)
    config = TrainConfig.from_dict(base, source="eval")
    if embedded and config.max_new_tokens is None:
        config = config.replace(max_new_tokens=config.task_digits + 2)
    if config.model is None:
        raise ValueError("model: give a run directory or --model DIR to evaluate")
    return config, embedded


def cmd_eval(args) -> dict:
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.trainer import Trainer

    config, embedded = _setup_errors(lambda: _eval_config(args))
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    try:
        log = _log(info)

        def setup():
            if embedded:
                # The embedded task's prompts and reward, with the trained policy of the run directory.
                from remax.data import addition_task
                from remax.model import attention_implementation, load_causal_lm, load_tokenizer
                from remax.rewards import load_reward

                task = addition_task(digits=config.task_digits, train_size=config.task_train_size,
                                     eval_size=config.eval_size, error_rate=config.demo_error_rate, seed=config.seed)
                device = pick_device(config.device)
                attn = attention_implementation(config.attn_implementation, device)
                parts = dict(policy=load_causal_lm(config.model, attn_implementation=attn),
                             tokenizer=load_tokenizer(config.tokenizer),
                             reward_fn=load_reward(config.reward, device=device, default=task["reward_fn"]),
                             prompts=task["train_prompts"], eval_prompts=task["eval_prompts"])
            else:
                parts = build_experiment(config, info, run_dir=".", log=log)
                parts.pop("ref_model")
            return Trainer(parts.pop("policy"), parts.pop("tokenizer"), parts.pop("reward_fn"), config=config,
                           dist_info=info, log=log, **parts)

        trainer = _setup_errors(setup)
        record = trainer.evaluate(0)
        log(f"held-out ({len(trainer.eval_prompts)} prompts): greedy reward {record['eval/reward_greedy']:.4f}, "
            f"sampled reward {record['eval/reward_sampled']:.4f}")
        return record
    finally:
        shutdown()


def cmd_plot(args) -> str:
    from remax.plotting import plot_run

    path = plot_run(args.run_dir, args.out)
    print(path)
    return path


def cmd_compare(args) -> dict:
    from remax.config import ESTIMATORS
    from remax.distributed import init_distributed, shutdown
    from remax.model import pick_device
    from remax.plotting import plot_compare
    from remax.trainer import Trainer

    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise UsageError(f"--estimators: {bad or args.estimators!r} not in {ESTIMATORS}")

    def make_config():
        config = load_config(args.config, parse_overrides(args.overrides))
        config = config.replace(track_grad_var=True, save_final_model=False, resume=None).with_task_defaults()
        for e in estimators:
            config.replace(estimator=e)  # each estimator's own constraints (rloo/grpo group sizes) fail here, early
        return config

    config = _setup_errors(make_config)
    info = init_distributed(_setup_errors(lambda: pick_device(config.device)).type)
    try:
        log = _log(info)
        root = config.run_dir or _default_run_dir(info, prefix="compare-")
        parts = _setup_errors(lambda: build_experiment(config, info, run_dir=root, log=log))
        runs, summaries = {}, {}
        for e in estimators:
            log(f"\n=== {e} ===")
            run_config = config.replace(estimator=e, run_dir=os.path.join(root, e))
            p = dict(parts, policy=copy.deepcopy(parts["policy"]))
            trainer = Trainer(p.pop("policy"), p.pop("tokenizer"), p.pop("reward_fn"), config=run_config,
                              dist_info=info, log=log, **p)
            summaries[e] = trainer.train()
            runs[e] = run_config.run_dir
        result = {"run_dir": root, "runs": summaries}
        if info.is_main:
            from remax.plotting import read_metrics

            for e, run_dir in runs.items():
                train, _ = read_metrics(run_dir)
                var = [r["grad_var"] for r in train if "grad_var" in r]
                summaries[e]["mean_grad_var"] = sum(var) / len(var) if var else None
            result["plot"] = plot_compare(runs, os.path.join(root, "compare.png"))
            with open(os.path.join(root, "compare.json"), "w") as fh:
                json.dump(result, fh, indent=2)
            log(format_compare(summaries))
            log(f"plot: {result['plot']}")
        return result
    finally:
        shutdown()


def format_compare(summaries: dict) -> str:
    lines = ["", f"{'estimator':12}{'greedy before':>15}{'greedy after':>14}{'sampled after':>15}{'mean grad var':>15}"]
    for e, s in summaries.items():
        var = s.get("mean_grad_var")
        lines.append(f"{e:12}{s['before']['greedy']:>15.4f}{s['after']['greedy']:>14.4f}{s['after']['sampled']:>15.4f}"
                     f"{var if var is not None else float('nan'):>15.3e}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remax", description="ReMax RLHF trainer", allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    fields = "config fields (--key value):\n" + TrainConfig.help()
    for name, helptext in (("train", "train a policy with ReMax (default: the embedded experiment)"),
                           ("compare", "remax vs reinforce vs rloo/grpo on the same task and budget")):
        p = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=fields,
                           allow_abbrev=False)
        p.add_argument("--config", help="YAML file of config fields")
        if name == "compare":
            p.add_argument("--estimators", default="remax,reinforce,rloo", help="comma-separated estimators")
    p = sub.add_parser("eval", help="held-out greedy and sampled reward of a trained policy",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=fields, allow_abbrev=False)
    p.add_argument("run_dir", nargs="?", help="a run directory (uses its config and final/ model)")
    p = sub.add_parser("plot", help="reward_curves.png of a run directory", allow_abbrev=False)
    p.add_argument("run_dir")
    p.add_argument("--out", help="output PNG (default RUN_DIR/reward_curves.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with the run's own output
    except ImportError:
        pass
    args, rest = parser.parse_known_args(argv)
    if args.command == "plot" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    handler = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "compare": cmd_compare}[args.command]
    try:
        handler(args)
    except UsageError as err:
        print(f"remax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"remax {args.command}: interrupted; the latest complete checkpoint is intact (resume with --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
