"""Plots made from a run's ``metrics.jsonl`` and ``config.yaml`` (matplotlib, Agg backend: no display needed).

Each figure says what it shows without the code: a title naming the estimator, the model or task and the budget;
every panel with a y-axis label and its units; legends in words.
"""

from __future__ import annotations

import json
import os

ESTIMATOR_NAMES = {
    "remax": "ReMax (greedy baseline)",
    "reinforce": "REINFORCE (no baseline)",
    "rloo": "RLOO (leave-one-out baseline)",
    "grpo": "GRPO (group-normalized)",
    "ppo": "PPO (value model + GAE)",
}


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` of ``RUN_DIR/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"run_dir: {run_dir!r} has no metrics.jsonl (not a run directory, or nothing ran yet)")
    train, evals = [], []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                (evals if record.get("split") == "eval" else train).append(record)
    return train, evals


def read_run_config(run_dir: str) -> dict:
    """The run's ``config.yaml`` as a flat dict (``{}`` when it has none)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    task = values.pop("task", None)
    if isinstance(task, dict):
        values.update({f"task.{k}": v for k, v in task.items()})
    return values


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe_task(config: dict) -> str:
    """What a run trains: the embedded addition task (digits, the Llama's layers and width), or its model and
    reward."""
    if config.get("model") is None and config:
        return (f"the embedded addition task ({config.get('task.digits', '?')}-digit sums, Llama of "
                f"{config.get('task.layers', '?')} layers x {config.get('task.hidden_size', '?')})")
    if not config:
        return "an unknown model (no config.yaml)"
    reward = config.get("reward")
    reward = os.path.basename(str(reward)) if reward else "?"
    return f"model {os.path.basename(os.path.normpath(str(config['model'])))}, reward {reward}"


def _reward_label(config: dict) -> str:
    if config and config.get("model") is None and config.get("reward") is None:
        return "mean reward per response\n(fraction of correct digits; 1 = exact sum)"
    return "mean reward per response\n(units of the reward function)"


def _title(run_dir: str, config: dict, evals: list[dict]) -> str:
    estimator = ESTIMATOR_NAMES.get(config.get("estimator"), config.get("estimator", "?"))
    lines = [f"{estimator} on {describe_task(config)}"]
    if config:
        kl = f", KL coef {config['kl_coef']:g}" if config.get("kl_coef") else ""
        lines.append(f"{config['steps']} steps x {config['batch_size']} prompts, lr {config['lr']:g} "
                     f"({config['lr_schedule']}){kl}; run {os.path.basename(os.path.normpath(run_dir))}")
    if len(evals) >= 2:
        lines.append(f"held-out greedy reward {evals[0]['eval/reward_greedy']:.3f} (step {evals[0]['step']}) -> "
                     f"{evals[-1]['eval/reward_greedy']:.3f} (step {evals[-1]['step']})")
    return "\n".join(lines)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_run(run_dir: str, out: str | None = None) -> str:
    """One run: reward (training batch and held-out), KL to the reference, entropy, response length, gradient norm
    and learning rate against the RL step. Writes ``RUN_DIR/reward_curves.png`` (or ``out``); returns its path."""
    plt = _pyplot()
    train, evals = read_metrics(run_dir)
    config = read_run_config(run_dir)
    out = out or os.path.join(run_dir, "reward_curves.png")
    window = max(1, len(train) // 20)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    steps = [r["step"] for r in train]

    ax = axes[0, 0]
    for key, label, color in (("reward/sampled", "sampled", "tab:blue"), ("reward/greedy", "greedy", "tab:orange")):
        # Only ReMax decodes greedy responses while training; every estimator has them at evaluation.
        if train and key in train[0]:
            ax.plot(steps, [r[key] for r in train], color=color, alpha=0.2, lw=0.8)
            ax.plot(steps, _smooth([r[key] for r in train], window), color=color,
                    label=f"training batch, {label} responses" + (f" ({window}-step average)" if window > 1 else ""))
        if evals:
            ax.plot([r["step"] for r in evals], [r[f"eval/reward_{label}"] for r in evals],
                    "o--" if label == "sampled" else "s--", color=color, mec="black", mew=0.5,
                    label=f"held-out prompts, {label} responses")
    ax.set_title("Reward")
    ax.set_ylabel(_reward_label(config))
    ax.legend(fontsize=8)

    for ax, key, title, ylabel, missing in (
        (axes[0, 1], "kl", "KL divergence to the frozen reference", "KL per response token (nats)",
         "no reference model (kl_coef = 0)"),
        (axes[0, 2], "entropy", "Policy entropy on the sampled tokens", "entropy per token (nats)",
         "not logged"),
    ):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color="tab:purple", alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(list(ys), window), color="tab:purple",
                    label="training batch" + (f" ({window}-step average)" if window > 1 else ""))
            ax.legend(fontsize=8)
        else:
            _empty(ax, missing)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    ax = axes[1, 0]
    longest = 1.0
    for key, label, color in (("sampled", "sampled", "tab:blue"), ("greedy", "greedy", "tab:orange")):
        values = [r[f"response_length/{key}"] for r in train] if train and f"response_length/{key}" in train[0] else []
        if values:
            ax.plot(steps, _smooth(values, window), color=color, label=f"training batch, {label}")
            longest = max(longest, max(values))
        if evals:
            ys = [r[f"eval/response_length_{key}"] for r in evals]
            ax.plot([r["step"] for r in evals], ys, "o--" if key == "sampled" else "s--", color=color, mec="black",
                    mew=0.5, label=f"held-out, {label}")
            longest = max(longest, max(ys))
    budget = config.get("max_new_tokens")
    if budget:
        ax.axhline(budget, color="0.5", ls=":", lw=1, label=f"max_new_tokens = {budget}")
    ax.set_ylim(0, 1.08 * max(longest, budget or 0))
    ax.set_title("Response length (mean over responses)")
    ax.set_ylabel("tokens (eos included)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    if train:
        ax.plot(steps, [r["grad_norm"] for r in train], color="tab:green", alpha=0.25, lw=0.8)
        ax.plot(steps, _smooth([r["grad_norm"] for r in train], window), color="tab:green",
                label="before clipping" + (f" ({window}-step average)" if window > 1 else ""))
        if config.get("max_grad_norm"):
            ax.axhline(config["max_grad_norm"], color="0.5", ls=":", lw=1,
                       label=f"clipped to max_grad_norm = {config['max_grad_norm']:g}")
        ax.legend(fontsize=8)
    ax.set_title("Gradient norm")
    ax.set_ylabel("L2 norm of the policy gradient")

    ax = axes[1, 2]
    if train:
        ax.plot(steps, [r["lr"] for r in train], color="tab:red")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("Learning rate (AdamW)")
    ax.set_ylabel("learning rate")

    for ax in axes.flat:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(_title(run_dir, config, evals), fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def _bars(ax, names: list[str], parts: list[tuple[str, list[float]]]) -> None:
    """Stacked bars: one per name, one segment per ``(label, values)`` part."""
    bottom = [0.0] * len(names)
    for label, values in parts:
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:.3g}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15 * max(bottom + [1e-12]))
    ax.tick_params(axis="x", labelsize=8)


def plot_compare(run_dirs: dict[str, str], out: str) -> str:
    """Estimators side by side: held-out greedy reward against the RL step and against the training wall time, the
    training reward, the gradient variance (absolute and relative to the squared gradient norm, with a caption that
    says how it is estimated), the time per step (rollout / reward / training) and the memory (model states by
    parameters / gradients / optimizer state, and the peak memory) of each.

    ``run_dirs`` maps a label (the estimator) to its run directory; the time and memory bars come from each run's
    ``summary.json`` (written at the end of a run). Returns ``out``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(4, 2, figsize=(15, 20))
    window = 1
    config: dict = {}
    names, summaries = [], []
    for label, run_dir in run_dirs.items():
        train, evals = read_metrics(run_dir)
        run_config = read_run_config(run_dir)
        config = config or run_config
        name = ESTIMATOR_NAMES.get(label, label)
        short = label
        if label in ("rloo", "grpo") and run_config.get("group_size"):
            name = f"{name}, k = {run_config['group_size']}"
            short = f"{label}, k = {run_config['group_size']}"
        names.append(short)
        summaries.append(_read_summary(run_dir))
        steps = [r["step"] for r in train]
        window = max(1, len(train) // 15)
        eval_steps = [r["step"] for r in evals]
        axes[0, 0].plot(eval_steps, [r["eval/reward_greedy"] for r in evals], "o-", label=name)
        elapsed, seconds = {0: 0.0}, 0.0
        for r in train:
            seconds += r["perf/step_time_s"]
            elapsed[r["step"]] = seconds
        timed = [(elapsed[s], r["eval/reward_greedy"]) for s, r in zip(eval_steps, evals, strict=True) if s in elapsed]
        if timed:
            axes[0, 1].plot(*zip(*timed, strict=True), "o-", label=name)
        axes[1, 0].plot(steps, _smooth([r["reward/sampled"] for r in train], window), label=name)
        var = [(r["step"], r["grad_var"], r["grad_norm"]) for r in train if "grad_var" in r]
        if var:
            s, v, n = zip(*var, strict=True)
            axes[1, 1].plot(s, _smooth([vi / max(ni**2, 1e-30) for vi, ni in zip(v, n, strict=True)], window),
                            label=name)
            axes[2, 0].plot(s, _smooth(list(v), window), label=name)
    avg = f" ({window}-step average)" if window > 1 else ""
    panels = (
        (axes[0, 0], "Held-out reward, greedy responses", _reward_label(config), "RL step"),
        (axes[0, 1], "Held-out reward against training time", _reward_label(config),
         "wall time of the RL steps (s; evaluations excluded)"),
        (axes[1, 0], f"Training reward, sampled responses{avg}", _reward_label(config), "RL step"),
        (axes[1, 1], f"Gradient variance relative to the gradient{avg}",
         "0.5 * ||g_A - g_B||^2 / ||g||^2  (log scale)", "RL step"),
        (axes[2, 0], f"Gradient variance{avg}", "0.5 * ||g_A - g_B||^2  (log scale)", "RL step"),
    )
    for ax, title, ylabel, xlabel in panels:
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in (axes[1, 1], axes[2, 0]):
        if ax.lines:
            ax.set_yscale("log")
        else:
            _empty(ax, "not logged (track_grad_var = false)")

    timed = [(n, s["time_per_step_s"]) for n, s in zip(names, summaries, strict=True) if "time_per_step_s" in s]
    ax = axes[2, 1]
    if timed:
        _bars(ax, [n for n, _ in timed],
              [(part, [t[part] for _, t in timed]) for part in ("rollout", "reward", "train")])
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no summary.json")
    ax.set_title("Time per RL step (median, first step left out)")
    ax.set_ylabel("seconds per step")
    states = [(n, s["model_states_bytes"]) for n, s in zip(names, summaries, strict=True) if "model_states_bytes" in s]
    ax = axes[3, 0]
    if states:
        _bars(ax, [n for n, _ in states], [(f"{part} (every model)", [sum(m[part] for m in st.values()) / 2**20
                                                                      for _, st in states])
                                           for part in ("params", "grads", "optimizer")])
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no summary.json")
    ax.set_title("Memory held in model states (all ranks)")
    ax.set_ylabel("MiB (parameters + gradients + optimizer state)")
    peaks = [(n, s["peak_mem_mb"], s.get("peak_mem_kind", "")) for n, s in zip(names, summaries, strict=True)
             if "peak_mem_mb" in s]
    ax = axes[3, 1]
    if peaks:
        _bars(ax, [n for n, _, _ in peaks], [("peak", [p for _, p, _ in peaks])])
        ax.set_ylabel(f"MiB ({peaks[0][2] or 'peak memory'})")
    else:
        _empty(ax, "no summary.json")
        ax.set_ylabel("MiB")
    ax.set_title("Peak memory while training")
    for ax in (axes[2, 1], axes[3, 0], axes[3, 1]):
        ax.set_xlabel("estimator")
        ax.grid(alpha=0.3, axis="y")

    budget = (f": {config['steps']} steps x {config['batch_size']} rows from the same warm-started policy"
              if config else "")
    fig.suptitle(f"Advantage estimators on {describe_task(config)}{budget}", fontsize=12)
    fig.text(0.5, 0.005, "Gradient variance: each step's batch (PPO: its first mini-batch) is split into halves A and "
             "B with mean gradients g_A and g_B (each an unbiased estimate of the batch gradient g);\n"
             "0.5 * ||g_A - g_B||^2 estimates the total variance (trace of the covariance) of a half-batch gradient "
             "without bias. Lower = less noisy updates at the same batch size;\nthe relative panel divides by "
             "||g||^2, which removes the gradient's scale.", ha="center", va="bottom", fontsize=9, color="0.25")
    fig.tight_layout(rect=(0, 0.035, 1, 0.98))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
