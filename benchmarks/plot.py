"""Pictures of a benchmark result file: per family, time, fraction of the device ceiling and peak memory.

    python -m benchmarks.plot benchmarks/results/<gpu>-<date>.json          # a benchmarks.run result
    python -m benchmarks.plot .benchmarks/<machine>/0001_<commit>_<date>.json  # a saved pytest-benchmark run
    python -m benchmarks.plot RESULTS.json --out /tmp/plots

Writes ``<family>.png`` for every measured family and ``targets.png`` into ``benchmarks/results/plots/<file stem>/``
(or ``--out``). Each family's figure has three panels over its cases (one group of bars per case, one bar per
provider: ours, our options, the baselines, the peers):

- time per call (median, ms; whiskers p20-p80), log scale when the bars span more than 20x, with each bar's time
  over ours written above it;
- the fraction of the device ceiling measured in the same run that the case's minimum work reaches at that time
  (copy bandwidth for memory-bound ops, bf16 matmul rate for the fused linear ops; 1.0 = at the ceiling);
- peak memory (``torch.cuda.max_memory_allocated`` during one call; a tick marks inputs + returned gradients).

Providers that did not run (not installed, CUDA only, failed) are listed under the figure with the reason. A smoke
run's figures say so in red: their numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from benchmarks import results as rs

PLOTS_DIR = Path(__file__).resolve().parent / "results" / "plots"
GiB = 2**30
# One color per provider across all figures; our own options in lighter shades of ours.
COLORS = {"ours": "#1f4e9c", "eager": "#7f7f7f", "compile": "#ff7f0e", "liger": "#2ca02c",
          "cut_cross_entropy": "#9467bd", "cublas_4mm": "#222222", "cublas_3mm": "#222222",
          "hf_generate_x2": "#7f7f7f", "eager_logits_loss": "#7f7f7f", "fused_linear_logprobs": "#17becf"}
OUR_OPTION_COLORS = ["#6a9fe0", "#a9c8f0", "#3b76c4"]
OTHER_COLORS = ["#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
LOG_SPAN = 20.0  # a panel switches to a log scale when its largest bar is this many times its smallest


def _num(value) -> float | None:
    """A finite number, or None (missing, or written as a string like "nan" in the result file)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _colors(providers: list[str]) -> dict[str, str]:
    colors, options, others = {}, iter(OUR_OPTION_COLORS), iter(OTHER_COLORS)
    for label in providers:
        if label in COLORS:
            colors[label] = COLORS[label]
        elif label.startswith("ours_"):
            colors[label] = next(options, "#6a9fe0")
        else:
            colors[label] = next(others, "#bbbbbb")
    return colors


def _case_label(case: dict) -> str:
    """The case name without its op (the figure is per family; the op starts each group's label only when the
    family has several ops), wrapped onto two lines."""
    words = case["name"].split()
    return " ".join(words[:2]) + "\n" + " ".join(words[2:]) if len(words) > 3 else case["name"]


def _entries(case: dict) -> dict[str, dict]:
    return {"ours": case["ours"], **case["baselines"]}


def _fraction(case: dict, entry: dict, ceilings: dict) -> tuple[float | None, str | None]:
    """The fraction of its device ceiling the case's minimum work reaches at this entry's time, and which ceiling."""
    ms, work = _num(entry.get("ms")), case.get("work", {})
    if ms is None:
        return None, None
    if _num(work.get("bytes")) is not None and _num(ceilings.get("copy_gbps")):
        return work["bytes"] / ms / 1e6 / ceilings["copy_gbps"], "copy"
    if _num(work.get("flops")) is not None and _num(ceilings.get("matmul_tflops")):
        return work["flops"] / ms / 1e9 / ceilings["matmul_tflops"], "matmul"
    return None, None


def _grouped_bars(ax, cases: list[dict], providers: list[str], colors: dict, values, *, errors=None,
                  annotate=None) -> list[float]:
    """One group of bars per case, one bar per provider (missing values leave a gap); returns the plotted values."""
    width = 0.8 / max(len(providers), 1)
    plotted = []
    for j, label in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            y = values(case, label)
            if y is None or y <= 0:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(y)
            low, high = errors(case, label) if errors else (y, y)
            lo.append(max(y - low, 0.0))
            hi.append(max(high - y, 0.0))
            text = annotate(case, label) if annotate else None
            if text:  # above the whisker; upright when the bars are wide enough to hold it
                ax.annotate(text, (xs[-1], max(y, high)), textcoords="offset points", xytext=(0, 2), ha="center",
                            va="bottom", fontsize=6, rotation=0 if len(providers) <= 4 else 90)
        if xs:
            ax.bar(xs, ys, width=width, color=colors[label], label=label,
                   yerr=[lo, hi] if errors else None, error_kw={"elinewidth": 0.8, "capsize": 1.5})
            plotted += ys
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([_case_label(c) for c in cases], fontsize=7)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    return plotted


def _maybe_log(ax, plotted: list[float]) -> None:
    if plotted and max(plotted) / min(plotted) > LOG_SPAN:
        ax.set_yscale("log")
        ax.set_ylim(top=max(plotted) * 4)  # room for the labels above the bars
    elif plotted:
        ax.set_ylim(0, max(plotted) * 1.3)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(results: dict, what: str) -> tuple[str, str | None]:
    env = results["environment"]
    title = (f"{what} | {env.get('device')} | {env.get('dtype')} | torch {env.get('torch')} | "
             f"triton {env.get('triton')} | {str(env.get('date', ''))[:10]}")
    warning = "SMOKE RUN (tiny shapes on the CPU): these numbers mean nothing" if env.get("smoke") else None
    return title, warning


def plot_family(results: dict, name: str, path: Path) -> Path:
    """Draw one family's figure (time, fraction of ceiling, peak memory) into ``path``."""
    family = results["families"][name]
    cases, ceilings = family["cases"], results["ceilings"]
    providers: list[str] = []
    for case in cases:
        providers += [p for p in _entries(case) if p not in providers]
    measured = [p for p in providers if any(_num(_entries(c).get(p, {}).get("ms")) for c in cases)]
    colors = _colors(measured)
    kinds = {_fraction(c, c["ours"], ceilings)[1] for c in cases} - {None}

    def peak(case, label):
        memory = _entries(case).get(label, {}).get("memory")
        return _num(memory.get("peak_bytes")) / GiB if memory and _num(memory.get("peak_bytes")) else None

    has_memory = any(peak(c, p) for c in cases for p in measured)
    # An empty panel (no ceiling applies, no memory statistics) keeps only the room for its one line of text.
    heights = [3.0, 2.0 if kinds else 0.4, 2.0 if has_memory else 0.4]
    fig = Figure(figsize=(max(8.0, 0.35 * len(cases) * max(len(measured), 1) + 3), 1.0 + 2.2 * sum(heights)),
                 layout="constrained")
    ax_time, ax_frac, ax_mem = fig.subplots(3, 1, height_ratios=heights)
    title, warning = _title(results, f"benchmarks: {name}")
    fig.suptitle(title + (f"\n{warning}" if warning else ""), fontsize=10, color="#b00000" if warning else "black")

    def ms(case, label):
        return _num(_entries(case).get(label, {}).get("ms"))

    def spread(case, label):
        entry = _entries(case)[label]
        return _num(entry.get("ms_p20")) or entry["ms"], _num(entry.get("ms_p80")) or entry["ms"]

    def vs_ours(case, label):
        ratio = _num(case["speedup"].get(label)) if label != "ours" else None
        return f"{ratio:.2g}x" if ratio is not None else None

    plotted = _grouped_bars(ax_time, cases, measured, colors, ms, errors=spread, annotate=vs_ours)
    _maybe_log(ax_time, plotted)
    ax_time.set_ylabel("time per call (ms, median)")
    ax_time.set_title("time (label: provider's time / ours; above 1 = ours faster)", fontsize=9)
    ax_time.legend(fontsize=7, ncols=min(len(measured), 6), loc="upper left")
    ax_time.grid(axis="y", alpha=0.3, which="both")

    if kinds:
        plotted = _grouped_bars(ax_frac, cases, measured, colors,
                                lambda c, p: _fraction(c, _entries(c).get(p, {}), ceilings)[0])
        ax_frac.axhline(1.0, color="#b00000", linewidth=1, linestyle="--")
        _maybe_log(ax_frac, plotted + [1.0])
        names = {"copy": f"copy {ceilings.get('copy_gbps', 0):.4g} GB/s",
                 "matmul": f"{ceilings.get('matmul_dtype')} matmul {ceilings.get('matmul_tflops', 0):.4g} TFLOP/s"}
        ax_frac.set_title("fraction of the device ceiling measured in the same run (dashed: the ceiling): "
                          + "; ".join(names[k] for k in sorted(kinds)), fontsize=9)
        ax_frac.set_ylabel("minimum work / time / ceiling")
        ax_frac.grid(axis="y", alpha=0.3, which="both")
    else:
        _empty(ax_frac, "no device ceiling applies to these cases (a whole rollout or RL step)")

    if has_memory:
        plotted = _grouped_bars(ax_mem, cases, measured, colors, peak)
        for i, case in enumerate(cases):
            floor = _num(case.get("inputs_grads_bytes"))
            if floor:
                ax_mem.hlines(floor / GiB, i - 0.45, i + 0.45, colors="#b00000", linewidth=1.2)
        _maybe_log(ax_mem, plotted)
        ax_mem.set_ylabel("peak memory (GiB)")
        ax_mem.set_title("peak memory of one call, inputs included (red tick: inputs + returned gradients)",
                         fontsize=9)
        ax_mem.grid(axis="y", alpha=0.3, which="both")
    else:
        _empty(ax_mem, "no peak memory recorded (a CPU run has no allocator statistics)")

    notes = sorted({f"{label}: {entry.get('skipped') or entry.get('error') or 'no finite time'}"
                    for case in cases for label, entry in _entries(case).items() if not _num(entry.get("ms"))})
    if notes:
        shown = notes[:6] + ([f"... and {len(notes) - 6} more"] if len(notes) > 6 else [])
        fig.supxlabel("\n".join(textwrap.wrap("not measured: " + " | ".join(shown), width=180)), fontsize=6,
                      x=0.01, ha="left")
    fig.savefig(path, dpi=110)
    return path


def plot_targets(results: dict, path: Path) -> Path | None:
    """Every target as a bar of how far it is from its threshold (1 = just met; right of the line = PASS)."""
    targets = results.get("targets") or []
    if not targets:
        return None
    fig = Figure(figsize=(11, 0.35 * len(targets) + 1.6), layout="constrained")
    ax = fig.subplots()
    scores, colors, labels = [], [], []
    for t in targets:
        measured, threshold = _num(t.get("measured")), _num(t.get("threshold"))
        score = None
        if measured and threshold:
            score = measured / threshold if t["higher_is_better"] else threshold / measured
        scores.append(score or 0.0)
        colors.append({True: "#2ca02c", False: "#d62728"}.get(t.get("pass"), "#bbbbbb"))
        need = f"{'>=' if t['higher_is_better'] else '<='} {t['threshold']:g}"
        got = "n/a" if measured is None else f"{measured:.3g}"
        labels.append(f"[{t.get('family')}] {t['target']}: {got} (need {need})")
    rows = range(len(targets))
    ax.barh(rows, [s if s > 0 else float("nan") for s in scores], color=colors)
    ax.set_yticks(list(rows))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    positive = [s for s in scores if s > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_xscale("log")
    ax.set_xlabel("measured / threshold (threshold / measured when lower is better): >= 1 passes", fontsize=8)
    title, warning = _title(results, "targets")
    fig.suptitle(title + (f"\n{warning}" if warning else ""), fontsize=10, color="#b00000" if warning else "black")
    fig.savefig(path, dpi=110)
    return path


def plot_results(results: dict, out_dir: Path) -> list[Path]:
    """All figures of one result (the runner's schema): one per measured family, then the targets."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_family(results, name, out_dir / f"{name}.png")
             for name, family in results["families"].items() if family.get("cases")]
    targets = plot_targets(results, out_dir / "targets.png")
    return paths + ([targets] if targets else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmarks.run JSON file or a saved pytest-benchmark JSON file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/plots/<results file stem>)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results: no such file: {args.results}")
    try:
        results = rs.load(args.results)
    except ValueError as exc:
        parser.error(str(exc))
    paths = plot_results(results, args.out or PLOTS_DIR / args.results.stem)
    if not paths:
        print("nothing to plot: no family has measured cases", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
