"""The ``remax`` command: train / resume / eval / plot / compare, user models and rewards, one-line errors.

Tests named after issue 9's bugs reproduce what a new user met; each failed before its fix.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from remax.cli import main
from remax.config import TaskConfig

TINY = ["--task.digits", "2", "--task.train_size", "64", "--eval_size", "8", "--eval_batch_size", "4",
        "--task.hidden_size", "32", "--task.layers", "1", "--task.heads", "2", "--task.sft_steps", "5",
        "--batch_size", "8", "--progress", "false", "--save_every", "1", "--device", "cpu", "--plot", "false"]


@pytest.fixture(autouse=True)
def _fast_and_isolated(monkeypatch):
    # Torch kernels (the interpreter is for the kernel tests); the CLI lowers torch's thread count: restore it.
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A folder holding a tiny HF causal LM (``policy/``), 40 prompts and a reward module, as a user would bring."""
    from remax.data import build_char_tokenizer
    from remax.model import build_tiny_llama

    root = tmp_path_factory.mktemp("user")
    tok = build_char_tokenizer()
    build_tiny_llama(tok, TaskConfig(hidden_size=32, layers=1, heads=2), seed=0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"q": f"{i}+{i}="}) + "\n" for i in range(40)))
    (root / "my_reward.py").write_text(
        "import torch\n"
        "def ones(prompts, responses, *, prompt_ids, response_ids):\n"
        "    return torch.tensor([float(r.count('1')) + 0.1 * len(ids) for r, ids in zip(responses, response_ids)])\n"
        "def bad(prompts, responses):\n"
        "    return torch.zeros(len(prompts), 2)\n"
        "import os\n"
        "DOWN_CALLS = [0]\n"
        "def down_later(prompts, responses):\n"
        "    DOWN_CALLS[0] += 1\n"
        "    after = {'down': 4, 'down-now': 0}.get(os.environ.get('REWARD_SERVER'))\n"
        "    if after is not None and DOWN_CALLS[0] > after:\n"
        "        raise ConnectionError('reward server down\\nmore detail on a second line')\n"
        "    return torch.ones(len(prompts))\n"
        "CALLS = [0]\n"
        "def nan_later(prompts, responses):\n"
        "    CALLS[0] += 1\n"
        "    return torch.full((len(prompts),), float('nan') if CALLS[0] > 4 else 1.0)\n"
    )
    return root


def _user_args(root, *extra):
    return ["--model", str(root / "policy"), "--prompts", str(root / "prompts.jsonl"), "--prompt_field", "q",
            "--batch_size", "4", "--steps", "2", "--max_new_tokens", "4", "--eval_size", "4", "--progress", "false",
            "--device", "cpu", "--cpu_threads", "1", "--plot", "false", *extra]


def _records(run_dir, split, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name)) as fh:
        return [r for r in map(json.loads, fh) if r.get("split", split) == split]


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--bogus", "1"], "--bogus: unknown option"),
        (["train", "--task_digits", "2"], "did you mean --task.digits?"),
        (["train", "--steps", "ten"], "--steps: expected int, got 'ten'"),
        (["train", "--estimator", "a2c"], "--estimator: invalid choice: 'a2c'"),
        (["train", "--model", "/nonexistent/model"], "model: '/nonexistent/model' is not a local directory"),
        (["train", "--resume", "/nonexistent/run"], "resume: '/nonexistent/run' has no config.yaml"),
        (["train", "--config", "/nonexistent.yaml"], "--config"),
        (["train", "--init_from", "/nonexistent/run"], "init_from: '/nonexistent/run' holds no saved warm-start"),
        (["compare", "--estimators", "remax,a2c"], "--estimators"),
        (["eval"], "model: give a run directory"),
        (["plot", "/nonexistent/run"], "run_dir: '/nonexistent/run' has no metrics.jsonl"),  # bug 7
    ],
)
def test_config_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    _one_line_error(capsys, needle)


def test_bug7_yaml_syntax_error_and_empty_model_dir_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\nlr: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    _one_line_error(capsys, f"--config: {bad} is not valid YAML at line 3, column 1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n' * 4)
    assert main(["train", "--model", str(tmp_path / "empty"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--reward", "remax.data:addition_reward", "--device", "cpu"]) == 2
    _one_line_error(capsys, "tokenizer: cannot load a tokenizer from")


def test_help_lists_every_field_and_its_allowed_values(capsys):
    from remax.config import config_fields

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name} " in out for name in config_fields())
    assert "--estimator {remax,reinforce,rloo,grpo,ppo}" in out and "--report_to {none,tensorboard}" in out
    assert "the embedded experiment" in out and "--task.sft_steps INT" in out


def test_train_resume_eval_plot(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--steps", "2", "--run_dir", run, "--warmup_steps", "0", "--plot", "true"]) == 0
    out = capsys.readouterr().out
    assert "before RL" in out and "after RL" in out and "eval @ step 0: greedy reward" in out
    assert "prompts: 64 for training, 8 held out" in out and "warning: only 8 held-out prompt(s)" in out
    assert "saved to" in out and f"--init_from {run}" in out
    assert os.path.isfile(os.path.join(run, "reward_curves.png"))
    assert os.path.isfile(os.path.join(run, "initial_policy", "warmstart.json"))
    assert [r["step"] for r in _records(run, "train")] == [1, 2]
    samples = _records(run, None, "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 0, 2, 2, 2]
    assert set(samples[0]) == {"step", "prompt", "greedy", "sampled", "reward_greedy", "reward_sampled"}
    assert f"  {samples[0]['prompt']!r} -> greedy {samples[0]['greedy']!r}" in out
    lr_end = _records(run, "train")[-1]["lr"]

    # Bug 8: a resume says what it does, extends without restarting the schedule, updates config.yaml, and its
    # summary counts the steps it ran.
    assert main(["train", "--resume", run, "--steps", "5", "--eval_every", "3", "--plot", "false"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from its checkpoint at step 2: steps 3-5 to run" in out
    assert "changed since the run's last invocation: steps 2 -> 5, eval_every 100 -> 3, plot True -> False" in out
    assert "learning rate: the cosine decay ends at step 2 (lr_decay_steps" in out
    assert "eval @ step 0" not in out and "last held-out eval @ step 2" in out
    assert "warm-start:" in out and "supervised" not in out and "(warm-start" not in out
    assert "resumed from step 2: ran steps 3-5 in" in out
    train = _records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and [r["step"] for r in _records(run, "eval")] == [0, 2, 3, 5]
    # The cosine decay ended with the first invocation: the extension continues at its floor, lr * min_lr_ratio,
    # instead of restarting the cosine over 5 steps (which gave 6.9e-4 at step 3, above the 5.5e-4 of step 2).
    assert lr_end == pytest.approx(5.5e-4) and [r["lr"] for r in train[2:]] == pytest.approx([1e-4] * 3)
    with open(os.path.join(run, "config.yaml")) as fh:
        text = fh.read()
    assert "steps: 5\n" in text and "lr_decay_steps: 2\n" in text and "eval_every: 3\n" in text
    with open(os.path.join(run, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["steps_run"] == 3 and summary["resumed_from"] == 2 and summary["step"] == 5
    assert [s["step"] for s in _records(run, None, "samples.jsonl")] == [0] * 3 + [2] * 3 + [3] * 3 + [5] * 3

    for argv, needle in (
        (["--steps", "2"], f"steps: {run} has already run 5 steps, so --steps 2 would run none"),
        ([], f"resume: {run} has finished its 5 steps; nothing to do"),
        (["--steps", "5", "--estimator", "rloo", "--group_size", "2"], "estimator 'remax' -> 'rloo'"),
        (["--steps", "5", "--batch_size", "4"], "batch_size 8 -> 4"),
    ):
        assert main(["train", "--resume", run, *argv]) == 2
        _one_line_error(capsys, needle)

    # A fresh run into a directory that holds checkpoints is refused (no silent overwrite).
    assert main(["train", *TINY, "--steps", "2", "--run_dir", run]) == 2
    _one_line_error(capsys, "already holds checkpoints")

    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    final = _records(run, "eval")[-1]
    assert f"greedy reward {final['eval/reward_greedy']:.4f}" in out
    assert f"sampled reward {final['eval/reward_sampled']:.4f}" in out
    assert f"  {samples[0]['prompt']!r} -> greedy" in out

    png = str(tmp_path / "again.png")
    assert main(["plot", run, "--out", png]) == 0 and os.path.getsize(png) > 10_000


def test_bug6_ctrl_c_says_what_was_saved_and_init_from_reuses_the_warm_start(tmp_path, capsys, monkeypatch):
    import remax.model
    import remax.trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = str(tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(remax.model, "sft_warmstart", interrupt)
        assert main(["train", *TINY, "--run_dir", run]) == 130
    err = capsys.readouterr().err
    assert "interrupted before anything was saved" in err and "--resume" not in err and not os.path.exists(run)

    with monkeypatch.context() as m:
        m.setattr(remax.trainer.Trainer, "evaluate", interrupt)
        assert main(["train", *TINY, "--steps", "2", "--run_dir", run]) == 130
    err = capsys.readouterr().err
    assert f"the warm-start is saved in {run}/initial_policy" in err and f"--init_from {run}" in err

    # --init_from: the saved warm-start, not a new one; the run equals one that warmed up itself.
    assert main(["train", *TINY, "--steps", "2", "--run_dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["train", "--init_from", run, "--steps", "2", "--batch_size", "8", "--progress", "false",
                 "--eval_batch_size", "4", "--device", "cpu", "--run_dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "warm-start: loaded from" in out and "supervised" not in out
    def strip(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in _records(run_dir, "train")]

    assert strip(tmp_path / "c") == strip(tmp_path / "b")
    # The warm-start's task, seed and eval_size are taken over; asking for others is refused.
    assert main(["train", "--init_from", run, "--task.digits", "3", "--device", "cpu"]) == 2
    _one_line_error(capsys, "task.digits 2 (asked: 3)")


def test_user_model_prompts_and_reward_module(user_model, tmp_path, capsys, recwarn, monkeypatch):
    run = str(tmp_path / "run")
    args = _user_args(user_model, "--kl_coef", "0.05", "--kl_penalty", "loss", "--gradient_checkpointing", "true")
    assert main(["train", *args, "--reward", f"{user_model / 'my_reward.py'}:ones", "--run_dir", run]) == 0
    assert len(_records(run, "train")) == 2 and "kl" in _records(run, "train")[0]
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))
    # Bug 11: no transformers deprecation warning, no "Writing model shards" bar.
    assert not [w for w in recwarn if "checkpointing" in str(w.message)], [str(w.message) for w in recwarn]
    assert "Writing model shards" not in capsys.readouterr().err

    # A reward returning the wrong shape fails in one line, before any model is loaded.
    assert main(["train", *args, "--reward", f"{user_model / 'my_reward.py'}:bad", "--run_dir", run + "2"]) == 2
    _one_line_error(capsys, "shape (2, 2)")
    assert not os.path.exists(run + "2")

    # Bug 3: 'module:function' from the current folder through the console script (no cwd on sys.path).
    monkeypatch.chdir(user_model)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(user_model))])
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)
    assert main(["train", *_user_args(user_model), "--reward", "my_reward:ones", "--run_dir", run + "4"]) == 0
    with open(os.path.join(run + "4", "config.yaml")) as fh:
        assert f"reward: {user_model / 'my_reward.py'}:ones" in fh.read()  # a path: resumable from anywhere


def test_bug7_nan_message_names_step_and_checkpoint(user_model, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *_user_args(user_model), "--reward", f"{user_model / 'my_reward.py'}:nan_later",
                 "--steps", "4", "--save_every", "1", "--run_dir", run]) == 2
    # Calls: two probes (the command's, before loading the model; the Trainer's), eval @ 0, step 1, step 2 (NaN).
    err = _one_line_error(capsys, "returned 8 NaN/inf value(s) out of 8; first: prompt ")
    assert f"(after 1 completed steps); {run} holds a complete checkpoint at step 1" in err
    assert f"continue with `remax train --resume {run}`" in err


def test_reward_exception_gets_a_line_a_checkpoint_and_the_resume_command(user_model, tmp_path, capsys,
                                                                        monkeypatch):
    """A reward that raises (a reward server going down) is treated as a NaN reward: one line naming the function and
    the exception, a checkpoint of the last finished step (save_every 0: made for the failure), a resumable run."""
    reward = f"{user_model / 'my_reward.py'}:down_later"
    run = str(tmp_path / "run")
    monkeypatch.setenv("REWARD_SERVER", "down")
    args = [*_user_args(user_model), "--reward", reward, "--steps", "3", "--save_every", "0", "--run_dir", run]
    assert main(["train", *args]) == 2
    err = _one_line_error(capsys, f"reward: {reward} raised ConnectionError: reward server down (after 1 completed "
                                  f"steps); {run} holds a complete checkpoint at step 1: fix the reward and continue "
                                  f"with `remax train --resume {run}`")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000001"], err
    # The server is back: the run continues from step 1 to the end.
    monkeypatch.delenv("REWARD_SERVER")
    assert main(["train", "--resume", run]) == 0
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    # Raising at the probe, before any model is loaded: the same line, nothing written.
    monkeypatch.setenv("REWARD_SERVER", "down-now")
    assert main(["train", *_user_args(user_model), "--reward", reward, "--run_dir", run + "2"]) == 2
    _one_line_error(capsys, f"reward: {reward} raised ConnectionError: reward server down")
    assert not os.path.exists(run + "2")


def test_bug1_bug2_lora_run_evaluates_with_the_documented_forms(user_model, tmp_path, capsys, recwarn):
    pytest.importorskip("peft")
    run = str(tmp_path / "lora")
    args = _user_args(user_model, "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj")
    assert main(["train", *args, "--reward", f"{user_model / 'my_reward.py'}:ones", "--run_dir", run]) == 0
    assert os.path.isfile(os.path.join(run, "final", "adapter_config.json"))
    final = _records(run, "eval")[-1]
    capsys.readouterr()
    # Bug 2: `remax eval RUN` on a LoRA run (was: "policy: has no trainable parameters").
    assert main(["eval", run]) == 0
    assert f"greedy reward {final['eval/reward_greedy']:.4f}" in capsys.readouterr().out
    # Bug 1: `--model DIR --eval_size 8`, as `remax eval --help` documents (was: "--model: missing value").
    assert main(["eval", "--model", str(user_model / "policy"), "--prompts", str(user_model / "prompts.jsonl"),
                 "--prompt_field", "q", "--reward", f"{user_model / 'my_reward.py'}:ones", "--eval_size", "8",
                 "--max_new_tokens", "4", "--device", "cpu"]) == 0
    assert "held-out (8 prompts)" in capsys.readouterr().out
    # Bug 11: peft's call of transformers' deprecated is_gradient_checkpointing is not shown to the user.
    assert not [w for w in recwarn if "checkpointing" in str(w.message)], [str(w.message) for w in recwarn]


def test_bug4_bug5_cpu_threads_warning_and_prompt_counts(user_model, tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text('{"q": "1+1="}\n')
    torch.set_num_threads(2)
    args = _user_args(user_model, "--reward", f"{user_model / 'my_reward.py'}:ones", "--cpu_threads", "0")
    assert main(["train", *args, "--prompts", str(tmp_path / "one.jsonl"), "--run_dir", str(tmp_path / "r")]) == 2
    out, err = capsys.readouterr()
    assert "warning: running on the CPU with torch's default of 2 threads" in out and "--cpu_threads 1" in out
    assert f"prompts: {tmp_path / 'one.jsonl'} holds 1 prompt: too few to hold some out for evaluation" in err
    # The shipped example's situation: 8 prompts, eval_size 64 -> 1 held out, said out loud.
    (tmp_path / "eight.jsonl").write_text("".join(json.dumps({"q": f"{i}+1="}) + "\n" for i in range(8)))
    assert main(["train", *args, "--prompts", str(tmp_path / "eight.jsonl"), "--eval_size", "64", "--steps", "1",
                 "--run_dir", str(tmp_path / "r8")]) == 0
    out = capsys.readouterr().out
    assert "prompts: 7 for training, 1 held out (the last 10% of the 8 prompts" in out
    assert "warning: only 1 held-out prompt(s)" in out


def test_bug9_yaml_paths_resolve_from_the_file_folder(user_model, tmp_path, capsys):
    config = user_model / "exp.yaml"
    config.write_text("model: policy\nprompts: prompts.jsonl\nprompt_field: q\nreward: my_reward:ones\n"
                      "batch_size: 4\nsteps: 1\nmax_new_tokens: 4\neval_size: 4\nprogress: false\ndevice: cpu\n")
    run = str(tmp_path / "run")  # run from another folder (the test's), never the YAML's
    assert main(["train", "--config", str(config), "--run_dir", run]) == 0
    with open(os.path.join(run, "config.yaml")) as fh:
        text = fh.read()
    assert f"model: {user_model / 'policy'}\n" in text and f"prompts: {user_model / 'prompts.jsonl'}\n" in text


def test_compare_writes_plot_and_table(tmp_path, capsys):
    root = str(tmp_path / "cmp")
    # A reward that varies whatever a barely warmed-up policy samples: every estimator gets a nonzero gradient.
    (tmp_path / "varied.py").write_text("def reward(prompts, responses):\n"
                                        "    return [r.count('1') + 0.25 * len(r) for r in responses]\n")
    argv = ["compare", *TINY, "--estimators", "remax,ppo", "--steps", "3", "--save_every", "0", "--run_dir", root,
            "--reward", f"{tmp_path / 'varied.py'}:reward"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    with open(os.path.join(root, "compare.json")) as fh:
        result = json.load(fh)
    assert set(result["runs"]) == {"remax", "ppo"} and result["isolated"]
    for name, summary in result["runs"].items():
        assert summary["mean_grad_var"] > 0 and name in out
        # Same task, same budget: every estimator starts from the same warm-started policy (saved once in ROOT).
        assert summary["before"] == result["runs"]["remax"]["before"]
        assert summary["steps_run"] == 3 and set(summary["time_per_step_s"]) == {"rollout", "reward", "train", "total"}
        assert summary["peak_mem_mb"] > 0 and summary["peak_mem_kind"] == "peak resident memory of the process"
    remax, ppo = result["runs"]["remax"], result["runs"]["ppo"]
    assert set(remax["model_states_bytes"]) == {"policy"} and set(ppo["model_states_bytes"]) == {"policy", "value"}
    assert ppo["parameters"]["trainable"] > 1.9 * remax["parameters"]["trainable"]
    targets = {t["name"]: t for t in result["targets"]}
    assert set(targets) == {"model_states", "time_per_step", "reward_after"} and targets["model_states"]["met"]
    with open(os.path.join(root, "compare.md")) as fh:
        table = fh.read()
    assert "| estimator | greedy before |" in table and "| ppo |" in table and "ReMax / PPO memory" in table
    assert os.path.getsize(os.path.join(root, "compare.png")) > 10_000


def test_default_experiment_is_wired(tmp_path, capsys):
    """`remax train` with the defaults (shortened: 2 RL steps, 30 warm-start steps): the documented experiment runs."""
    run = str(tmp_path / "default")
    assert main(["train", "--steps", "2", "--task.sft_steps", "30", "--progress", "false", "--plot", "false",
                 "--run_dir", run]) == 0
    out = capsys.readouterr().out
    defaults = TaskConfig()
    with open(os.path.join(run, "initial_policy", "config.json")) as fh:
        llama = json.load(fh)
    assert llama["model_type"] == "llama" and llama["hidden_size"] == defaults.hidden_size
    assert llama["num_hidden_layers"] == defaults.layers and llama["vocab_size"] == 16
    evals = _records(run, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/response_length_greedy"] <= defaults.digits + 2
    assert "warm-start" in out and "before RL" in out and "prompts: 4096 for training, 256 held out" in out
    with open(os.path.join(run, "config.yaml")) as fh:
        assert "estimator: remax" in fh.read()


def test_negative_numbers_are_values_not_options(capsys):
    """`--lr -1e-3` read as a flag gave "expected one argument"; now it gets the check `--lr=-1e-3` gets, for every
    numeric option."""
    from remax.config import parse_overrides

    assert main(["train", "--lr=-1e-3"]) == 2
    joined = _one_line_error(capsys, "lr: must be > 0, got -0.001")
    assert main(["train", "--lr", "-1e-3"]) == 2
    assert _one_line_error(capsys, "lr: must be > 0, got -0.001") == joined
    assert main(["train", "--task.sft_lr", "-.5E+2"]) == 2
    _one_line_error(capsys, "task.sft_lr: must be > 0, got -50.0")
    assert parse_overrides(["--seed", "-3", "--min_p", "-0.0", "--clip_reward", "-inf", "--task.digits", "-2"]) == {
        "seed": -3, "min_p": -0.0, "clip_reward": float("-inf"), "task": {"digits": -2}}
    # A flag after a flag is still a missing value.
    assert main(["train", "--lr", "--steps", "2"]) == 2
    _one_line_error(capsys, "--lr: expected one argument")


def test_compare_creates_the_parents_of_its_run_dir(user_model, tmp_path, capsys):
    """`remax compare --run_dir runs/cmp` with no runs/ yet: FileNotFoundError from save_config before; now made,
    parents included, as `remax train` does."""
    root = tmp_path / "not" / "yet" / "cmp"
    assert main(["compare", *_user_args(user_model), "--reward", f"{user_model / 'my_reward.py'}:ones",
                 "--estimators", "remax", "--steps", "1", "--save_every", "0", "--run_dir", str(root)]) == 0
    with open(root / "compare.json") as fh:
        assert json.load(fh)["runs"]["remax"]["steps_run"] == 1
