"""What a run tells its user: the ``remax`` logger (levels, quiet, rank 0 only), samples, TensorBoard, plots."""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import pytest

from remax.logs import get_logger, setup_logging
from tests.helpers.trainer_setup import make_trainer, tiny_config


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")
    yield
    setup_logging("info")


def _trainer(tmp_path, *, quiet=False, **changes):
    return make_trainer(tiny_config(tmp_path, **changes), quiet=quiet)


def test_levels_and_quiet(tmp_path, capsys):
    # warmup_steps 1: the default 50 outlasts these 2-step runs, which warns (test_trainer's warm-up test).
    _trainer(tmp_path / "a", log_level="debug", eval_size=32, warmup_steps=1).train()
    out = capsys.readouterr().out
    assert "prompts: 64 for training, 32 held out" in out and "eval @ step 0: greedy reward" in out
    assert "step 1: reward sampled" in out and "step 2: reward sampled" in out  # one line per step at debug
    assert "before RL" in out and "warning" not in out

    _trainer(tmp_path / "b", eval_size=32).train()
    out = capsys.readouterr().out
    assert "eval @ step 0" in out and "step 1: reward sampled" not in out

    _trainer(tmp_path / "c", log_level="warning", warmup_steps=1).train()
    out = capsys.readouterr().out
    assert out.startswith("warning: only 8 held-out prompt(s)") and "eval @" not in out and "before RL" not in out

    # quiet: no progress bar, no messages; warnings still show.
    _trainer(tmp_path / "d", quiet=True, progress=True, warmup_steps=1).train()
    out, err = capsys.readouterr()
    assert out.startswith("warning: only 8 held-out") and len(out.strip().splitlines()) == 1 and "remax:" not in err


def test_no_hugging_face_progress_bars(tmp_path, capsys):
    """Issue 9, bug 11: save_pretrained's "Writing model shards" bar showed with progress=False."""
    make_trainer(tiny_config(tmp_path, steps=1, save_final_model=True)).train()
    assert "Writing model shards" not in capsys.readouterr().err


def test_other_ranks_show_errors_only(capsys):
    setup_logging("debug", is_main=False)
    log = get_logger("trainer")
    log.info("not shown")
    log.warning("not shown either")
    log.error("shown")
    assert capsys.readouterr().out == "error: shown\n"
    setup_logging("info")
    log.info("rank 0")
    assert capsys.readouterr().out == "rank 0\n"
    assert logging.getLogger("remax").propagate is False  # one copy of each line under an application's logging


def test_samples_each_evaluation(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, steps=2, eval_every=1, log_samples=2))
    trainer.train()
    with open(os.path.join(trainer.run_dir, "samples.jsonl")) as fh:
        samples = [json.loads(line) for line in fh]
    assert [s["step"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert [s["prompt"] for s in samples[:2]] == trainer.eval_prompts[:2] == [s["prompt"] for s in samples[-2:]]
    for s in samples:
        assert isinstance(s["greedy"], str) and isinstance(s["sampled"], str)
        assert s["reward_greedy"] == pytest.approx(s["greedy"].count("1") + 0.25 * len(s["greedy"]))
    record = trainer.evaluate()
    assert record["samples"][0]["greedy"] == samples[-2]["greedy"]  # the same prompts and noise every time


class _StubWriter:
    """Records what the trainer sends to TensorBoard's SummaryWriter."""

    instances: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.texts, self.closed = log_dir, purge_step, {}, [], False
        _StubWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_text(self, tag, text, step):
        self.texts.append((tag, step, text))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_StubWriter))
    _StubWriter.instances.clear()
    config = tiny_config(tmp_path, steps=2, save_every=1, report_to="tensorboard")
    make_trainer(config).train()
    writer = _StubWriter.instances[-1]
    assert writer.log_dir == os.path.join(config.run_dir, "tensorboard") and writer.purge_step is None
    assert writer.closed and [s for s, _ in writer.scalars["reward/sampled"]] == [1, 2]
    assert [s for s, _ in writer.scalars["eval/reward_greedy"]] == [0, 2] and "grad_norm" in writer.scalars
    assert [(tag, step) for tag, step, _ in writer.texts] == [("eval/samples", 0), ("eval/samples", 2)]
    # A resume purges the events after its checkpoint (they are logged again).
    make_trainer(config.replace(resume=config.run_dir, steps=3)).train()
    assert _StubWriter.instances[-1].purge_step == 3


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(ValueError, match=r"report_to: 'tensorboard' needs the tensorboard package \(pip install"):
        make_trainer(tiny_config(tmp_path, report_to="tensorboard"))


def test_plots_name_what_they_show(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from remax.plotting import plot_compare, plot_run

    config = tiny_config(tmp_path, steps=2, kl_coef=0.1, track_grad_var=True)
    make_trainer(config).train()
    figures = []
    real_close = plt.close
    plt.close = figures.append  # keep the figures to read their labels
    try:
        plot_run(config.run_dir)
        plot_compare({"remax": config.run_dir}, str(tmp_path / "compare.png"))
    finally:
        plt.close = real_close
    run_fig, compare_fig = figures
    title = run_fig._suptitle.get_text()
    assert "ReMax (greedy baseline) on the embedded addition task (2-digit sums" in title
    assert "2 steps x 8 prompts, lr 0.01 (cosine), KL coef 0.1" in title
    for ax in run_fig.axes:
        assert ax.get_ylabel() and ax.get_title() and ax.get_xlabel() == "RL step"
    for ax in compare_fig.axes:  # curves against the step or the training time; bars per estimator
        assert ax.get_ylabel() and ax.get_title() and ax.get_xlabel() in (
            "RL step", "wall time of the RL steps (s; evaluations excluded)", "estimator")
    bars = {ax.get_title(): ax for ax in compare_fig.axes if ax.get_xlabel() == "estimator"}
    assert set(bars) == {"Time per RL step (median, first step left out)", "Memory held in model states (all ranks)",
                         "Peak memory while training"}
    assert all(len(ax.patches) >= 1 for ax in bars.values())  # read from the run's summary.json
    kl = next(ax for ax in run_fig.axes if ax.get_title().startswith("KL"))
    assert kl.get_ylabel() == "KL per response token (nats)" and len(kl.lines) == 2  # its own axis, not shared
    length = next(ax for ax in run_fig.axes if ax.get_title().startswith("Response length"))
    assert length.get_ylim()[0] == 0 and length.get_ylim()[1] <= 1.08 * 4 + 1e-9  # up to max_new_tokens
    caption = "Gradient variance: each step's batch (PPO: its first mini-batch) is split into halves"
    assert any(caption in t.get_text() for t in compare_fig.texts)
    for fig in figures:
        real_close(fig)
    assert os.path.getsize(os.path.join(config.run_dir, "reward_curves.png")) > 10_000


def test_progress_lines_on_stderr_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    """progress "true": the evaluations' and rollouts' lines (prompts done / total, tokens/s) and the step bar on
    stderr; "auto" (the default) under capture, where stderr is no terminal: none; stdout (the log) alike in both."""
    _trainer(tmp_path / "on", progress="true", warmup_steps=1, eval_batch_size=4).train()
    out_on, err = capsys.readouterr()
    for needle in ("eval @ step 0: ", "4/8", "8/8", "tokens/s", "rollout, step 1", "rollout, step 2", "remax: "):
        assert needle in err, (needle, err)
    assert "\r" not in out_on
    _trainer(tmp_path / "auto", progress="auto", warmup_steps=1, eval_batch_size=4).train()
    out_auto, err = capsys.readouterr()
    assert err == ""
    assert len(out_auto.splitlines()) == len(out_on.splitlines())  # the same log lines either way


def test_progress_option_values(tmp_path):
    from remax.config import TrainConfig, parse_overrides

    assert tiny_config(tmp_path).progress == "false"  # progress=False, the bool form, still works
    assert TrainConfig.from_dict({"progress": True}).progress == "true"  # YAML's `progress: true`
    assert TrainConfig().progress == "auto" and parse_overrides(["--progress", "auto"]) == {"progress": "auto"}
    with pytest.raises(ValueError, match="progress"):
        TrainConfig(progress="sometimes")


def test_warmup_longer_than_the_run_warns_and_the_summary_states_the_peak_lr(tmp_path, capsys):
    from remax.trainer import format_summary

    summary = _trainer(tmp_path / "a", steps=3, warmup_steps=10, lr=1e-2, quiet=True).train()
    out = capsys.readouterr().out
    assert ("warning: warmup_steps 10 > steps 3: the learning rate climbs to 0.003 at most and never reaches lr 0.01 "
            "(not capped); --warmup_steps 1 reaches it") in out
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as fh:
        lrs = [r["lr"] for r in map(json.loads, fh) if r["split"] == "train"]
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3]) and summary["lr"]["peak"] == max(lrs)
    assert "learning rate: peak 0.003, below lr 0.01 (warmup_steps 10 > steps 3)" in format_summary(summary)

    summary = _trainer(tmp_path / "b", steps=3, warmup_steps=3, lr=1e-2, quiet=True).train()
    assert "warmup_steps" not in capsys.readouterr().out
    assert summary["lr"]["peak"] == pytest.approx(1e-2)
    assert "learning rate: peak 0.01\n" in format_summary(summary)
