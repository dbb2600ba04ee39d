"""Plots made from ``metrics.jsonl`` files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` of ``RUN_DIR/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"run_dir: {run_dir!r} has no metrics.jsonl")
    train, evals = [], []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                (evals if record.get("split") == "eval" else train).append(record)
    return train, evals


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


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Reward curves (train batch and held-out eval, sampled and greedy) plus KL / entropy / length panels.

    Writes ``RUN_DIR/reward_curves.png`` (or ``out``) and returns its path.
    """
    plt = _pyplot()
    train, evals = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "reward_curves.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        window = max(1, len(train) // 20)
        for key, label, color in (("reward/sampled", "train sampled", "tab:blue"),
                                  ("reward/greedy", "train greedy", "tab:orange")):
            ax.plot(steps, [r[key] for r in train], color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth([r[key] for r in train], window), color=color, label=f"{label} (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/reward_sampled"] for r in evals], "o--", color="tab:blue",
                label="held-out sampled")
        ax.plot([r["step"] for r in evals], [r["eval/reward_greedy"] for r in evals], "s--", color="tab:orange",
                label="held-out greedy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("reward")
    ax.legend(fontsize=8)
    for ax, keys, title in ((axes[1], ("kl", "entropy"), "KL to reference / entropy"),
                            (axes[2], ("response_length/sampled", "response_length/greedy"), "response length")):
        for key in keys:
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(run_dirs: dict[str, str], out: str) -> str:
    """Estimators side by side: smoothed train sampled reward, held-out greedy reward, and the gradient variance
    (``grad_var``, log scale, and relative to the squared gradient norm).

    ``run_dirs`` maps a label (the estimator) to its run directory. Returns ``out``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for label, run_dir in run_dirs.items():
        train, evals = read_metrics(run_dir)
        steps = [r["step"] for r in train]
        window = max(1, len(train) // 15)
        axes[0].plot(steps, _smooth([r["reward/sampled"] for r in train], window), label=label)
        axes[1].plot([r["step"] for r in evals], [r["eval/reward_greedy"] for r in evals], "o-", label=label)
        var = [(r["step"], r["grad_var"], r["grad_norm"]) for r in train if "grad_var" in r]
        if var:
            s, v, n = zip(*var, strict=True)
            axes[2].plot(s, _smooth(list(v), window), label=label)
            axes[3].plot(s, _smooth([vi / max(ni**2, 1e-30) for vi, ni in zip(v, n, strict=True)], window),
                         label=label)
    titles = ("train sampled reward (smoothed)", "held-out greedy reward", "gradient variance (half-batch)",
              "gradient variance / ||g||^2")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    axes[3].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
