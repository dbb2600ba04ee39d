"""remax.Trainer end to end on a tiny Llama: gradients against a float64 reference, metrics, resume exactness,
clear errors before heavy work.

The trainer's kernels run through the torch backend here (REMAX_KERNELS_BACKEND=torch, set per test): the
interpreter would make multi-step runs slow, and the kernels have their own tests. One test runs a step through
the Triton kernels (the interpreter on CPU) to check the wiring.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from remax.data import build_char_tokenizer
from remax.model import build_tiny_llama
from remax.trainer import PERF_PREFIX, Trainer, derive_seed
from tests.helpers.trainer_setup import make_trainer, tiny_config, varied_reward


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")


# --- the gradient of one step against a float64 reference --------------------------------------------------------


def _reference_grads(policy, ref, rollout, r_s, r_g, config):
    """The step's gradient recomputed in float64 with full logits, from the formulas (not the library)."""
    model = copy.deepcopy(policy).double()
    ids, attn, resp = rollout["sampled_ids"], rollout["sampled_attention_mask"], rollout["sampled_response_mask"]
    R = resp.shape[1]
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)

    def logp_and_entropy(m):
        logits = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1 : -1] / config.temperature
        logsm = torch.log_softmax(logits.double(), -1)
        return logsm.gather(-1, ids[:, -R:, None])[..., 0], -(logsm.exp() * logsm).sum(-1)

    logp, entropy = logp_and_entropy(model)
    m = resp.double()
    r_s, r_g = r_s.double(), r_g.double()
    k = config.group_size
    if config.estimator == "remax":
        score = r_s - r_g
    elif config.estimator == "reinforce":
        score = r_s
    elif config.estimator == "rloo":
        g = r_s.view(-1, k)
        score = ((g.sum(1, keepdim=True) - g) / (k - 1)).neg().add(g).reshape(-1)
    else:
        g = r_s.view(-1, k)
        score = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).reshape(-1)
    adv = score[:, None] * m
    loss_kl = 0.0
    if ref is not None:
        with torch.no_grad():
            ref_logp = logp_and_entropy(copy.deepcopy(ref).double())[0]
        if config.kl_penalty == "reward":
            kl = (rollout["sampled_logprobs"].double() - ref_logp) * m
            adv = adv - config.kl_coef * kl.flip(1).cumsum(1).flip(1) * m  # KL summed from t to the end
        else:
            d = logp - ref_logp  # k1 estimator in the loss
            loss_kl = config.kl_coef * (d * m).sum() / m.sum()
    if config.loss_agg_mode == "seq-mean-token-mean":
        loss = ((-adv * logp * m).sum(1) / m.sum(1)).mean()
    elif config.loss_agg_mode == "seq-mean-token-sum-norm":  # verl >= 0.8: sum / (B * norm), norm = the budget
        loss = (-adv * logp * m).sum(1).mean() / config.response_budget
    else:
        loss = (-adv * logp * m).sum() / m.sum() + loss_kl - config.entropy_coef * (entropy * m).sum() / m.sum()
    loss.backward()
    return [p.grad for p in model.parameters()]


CASES = {
    "remax": dict(),
    "remax-temperature-accum": dict(temperature=1.7, max_new_tokens=8, grad_accum=2),
    "remax-seq-mean-accum": dict(temperature=1.7, max_new_tokens=8, grad_accum=4, loss_agg_mode="seq-mean-token-mean"),
    "remax-sum-norm-accum": dict(temperature=1.7, max_new_tokens=8, grad_accum=4,
                                 loss_agg_mode="seq-mean-token-sum-norm"),
    "remax-kl-reward": dict(kl_coef=0.3, kl_penalty="reward"),
    "remax-kl-loss-entropy": dict(kl_coef=0.3, kl_penalty="loss", kl_estimator="k1", entropy_coef=0.01, grad_accum=4),
    "reinforce": dict(estimator="reinforce"),
    "rloo": dict(estimator="rloo", group_size=4, grad_accum=2, temperature=1.7, max_new_tokens=8),
    "grpo": dict(estimator="grpo", group_size=2),
}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("case", list(CASES))
def test_step_gradient_matches_float64_reference(tmp_path, case):
    config = tiny_config(tmp_path, **CASES[case])
    trainer = make_trainer(config)
    trainer.run_dir = config.run_dir
    if config.kl_coef:
        trainer.train_step(0)  # at step 0 the policy equals its reference: take step 1, where KL is not 0
    captured = {}
    generate, reward_fn, step = trainer._generate, trainer.reward_fn, trainer.optimizer.step

    def spy_generate(jobs, **kw):
        captured["policy"] = copy.deepcopy(trainer.policy)
        captured["rollout"] = generate(jobs, **kw)[0]
        return [captured["rollout"]]

    def spy_reward(prompts, responses, **kw):
        captured["rewards"] = reward_fn(prompts, responses, **kw)
        return captured["rewards"]

    def spy_step(*a, **kw):
        captured["grads"] = [p.grad.clone() for p in trainer.policy.parameters()]
        return step(*a, **kw)

    trainer._generate, trainer.reward_fn, trainer.optimizer.step = spy_generate, spy_reward, spy_step
    record = trainer.train_step(1 if config.kl_coef else 0)

    B = config.batch_size
    r_s, r_g = captured["rewards"][:B], captured["rewards"][B:]
    # Only ReMax decodes (and scores) the greedy responses; the others' rollouts are sampled-only.
    assert len(r_g) == (B if config.estimator == "remax" else 0)
    rollout = captured["rollout"]
    resp = rollout["sampled_response_mask"]
    assert resp.any()
    assert r_s.std() > 0  # the reference must see different advantages
    if config.grad_accum > 1:
        # Micro-batches must hold different numbers of tokens, or a wrong normalization would go unnoticed.
        assert len(set(resp.view(config.grad_accum, -1).sum(1).tolist())) > 1
    ref = trainer.ref_runner.model if trainer.ref_runner is not None else None
    expected = _reference_grads(captured["policy"], ref, rollout, r_s, r_g, config)
    got = captured["grads"]
    num = math.sqrt(sum(float((g.double() - e).square().sum()) for g, e in zip(got, expected, strict=True)))
    den = math.sqrt(sum(float(e.square().sum()) for e in expected))
    assert den > 0 and num / den < 1e-4, f"relative gradient error {num / den:.2e}"
    assert math.isclose(record["grad_norm"], den, rel_tol=1e-4)
    assert math.isclose(record["reward/sampled"], float(r_s.mean()), rel_tol=1e-6)
    if config.estimator == "remax":
        assert math.isclose(record["reward/greedy"], float(r_g.mean()), rel_tol=1e-6)
    else:
        assert "reward/greedy" not in record and "greedy_ids" not in rollout


def test_rollout_seeding_is_per_row(tmp_path):
    """A row's response depends on (seed, step, row) only: not on the chunking (rollout_batch_size)."""
    config = tiny_config(tmp_path, temperature=1.5)
    a = make_trainer(config)
    b = make_trainer(config.replace(rollout_batch_size=3))
    texts = a.prompts[:8]
    seeds = [derive_seed(0, "rollout", 0, i) for i in range(8)]
    ra = a._generate([(texts, seeds, 8)])[0]
    rb = b._generate([(texts, seeds, 3)])[0]
    assert torch.equal(ra["sampled_ids"], rb["sampled_ids"]) and torch.equal(ra["greedy_ids"], rb["greedy_ids"])
    rc = a._generate([(texts, [s + 1 for s in seeds], 8)])[0]
    assert not torch.equal(ra["sampled_ids"], rc["sampled_ids"])


@pytest.mark.parametrize("truncation", [dict(top_p=0.5), dict(top_k=3), dict(min_p=0.9)])
def test_kl_compares_full_distributions_when_sampling_truncates(tmp_path, truncation):
    # At the first step the policy IS its reference, so the KL is 0 whatever the sampling filter; the rollout's
    # log-probs (of the renormalized, truncated distribution) would make it positive.
    trainer = make_trainer(tiny_config(tmp_path, kl_coef=0.1, temperature=1.3, **truncation))
    record = trainer.train_step(0)
    assert abs(record["kl"]) < 1e-5, record["kl"]


def test_rloo_groups_share_a_prompt_with_distinct_samples(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, estimator="rloo", group_size=4, temperature=2.0))
    rows = trainer.step_prompt_indices(0)
    assert rows.tolist()[:4] == [rows[0].item()] * 4 and rows[4] != rows[0]
    seen = set()
    for step in range(8):  # 8 steps x 2 prompts = the 16 first prompts of a permutation: all distinct
        seen.update(trainer.step_prompt_indices(step)[::4].tolist())
    assert len(seen) == 16


# --- a full run: files, metrics, resume ---------------------------------------------------------------------------


def _strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith(PERF_PREFIX)} for r in records]


def _read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_train_writes_metrics_plot_checkpoint_and_final_model(tmp_path):
    config = tiny_config(tmp_path, steps=3, save_every=2, kl_coef=0.1, track_grad_var=True)
    summary = make_trainer(config).train()
    run = config.run_dir
    records = _read_jsonl(os.path.join(run, "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    for key in ("reward/sampled", "reward/greedy", "adv/mean", "adv/std", "kl", "entropy", "grad_norm", "grad_var",
                "response_length/sampled", "perf/tokens_per_s", "perf/peak_mem_mb", "perf/step_time_s", "lr"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert all(r["grad_var"] > 0 and r["entropy"] > 0 for r in train)
    assert summary["before"]["greedy"] == evals[0]["eval/reward_greedy"]
    assert summary["after"]["sampled"] == evals[-1]["eval/reward_sampled"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000002", "step_00000003"]
    assert os.path.isfile(os.path.join(run, "final", "config.json"))
    assert os.path.isfile(os.path.join(run, "config.yaml")) and os.path.isfile(os.path.join(run, "summary.json"))


class _Crash(KeyboardInterrupt):
    pass


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    changes = dict(steps=5, save_every=2, kl_coef=0.1, lr_schedule="cosine", eval_every=3)
    full = tiny_config(tmp_path / "a", **changes)
    make_trainer(full).train()

    calls = {"n": 0}

    def crashing_reward(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 6:  # probe, eval @0, steps 1-3 (checkpoint @2), then Ctrl-C in the evaluation @3
            raise _Crash
        return varied_reward(prompts, responses)

    crashed = tiny_config(tmp_path / "b", **changes)
    with pytest.raises(_Crash):
        make_trainer(crashed, reward=crashing_reward).train()
    assert sorted(os.listdir(os.path.join(crashed.run_dir, "checkpoints")))[-1] == "step_00000002"

    resumed = make_trainer(crashed.replace(resume=crashed.run_dir), reward=varied_reward)
    resumed.train()
    a = _strip_perf(_read_jsonl(os.path.join(full.run_dir, "metrics.jsonl")))
    b = _strip_perf(_read_jsonl(os.path.join(crashed.run_dir, "metrics.jsonl")))
    assert a == b  # exact: same floats, same steps, no duplicated or missing records
    wa = load_file(os.path.join(full.run_dir, "final", "model.safetensors"))
    wb = load_file(os.path.join(crashed.run_dir, "final", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- errors before heavy work ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reward", "exc", "needle"),
    [
        (lambda p, r: torch.zeros(len(p) + 1), ValueError, "shape"),
        (lambda p, r: torch.full((len(p),), float("nan")), ValueError, "NaN"),
        (lambda p, r: "good", TypeError, "float tensor"),
    ],
)
def test_bad_reward_fails_at_construction(tmp_path, reward, exc, needle):
    with pytest.raises(exc, match=needle):
        make_trainer(tiny_config(tmp_path), reward=reward)


def test_constructor_errors(tmp_path):
    tok = build_char_tokenizer()
    config = tiny_config(tmp_path)
    policy = build_tiny_llama(tok, config.task, seed=0)
    with pytest.raises(TypeError, match="config"):
        Trainer(policy, tok, varied_reward, config={"steps": 1}, prompts=["1+1="])
    with pytest.raises(ValueError, match="prompts"):
        Trainer(policy, tok, varied_reward, config=config)
    with pytest.raises(ValueError, match="prompts"):
        Trainer(policy, tok, varied_reward, config=config, prompts=[], eval_prompts=["1+1="])


def test_lora_adapters_or_a_clear_error(tmp_path):
    config = tiny_config(tmp_path, lora_r=4, lora_target_modules="q_proj,v_proj")
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="lora_r: LoRA needs peft"):
            make_trainer(config)
        return
    trainer = make_trainer(config)
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.run_dir = config.run_dir
    assert math.isfinite(trainer.train_step(0)["grad_norm"])


def test_save_every_minus_one_writes_no_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=2, save_every=-1, save_final_model=False)
    make_trainer(config).train()
    assert not os.path.exists(os.path.join(config.run_dir, "checkpoints"))
    with pytest.raises(ValueError, match="save_every"):
        tiny_config(tmp_path, save_every=-2)


def test_run_dir_with_checkpoints_needs_resume(tmp_path):
    config = tiny_config(tmp_path, steps=1)
    make_trainer(config).train()
    with pytest.raises(ValueError, match="resume"):
        make_trainer(config).train()


# --- the Triton kernels (interpreter on CPU) in one step ----------------------------------------------------------


def test_one_step_through_triton_kernels(tmp_path, monkeypatch):
    from remax_kernels._dispatch import interpreter_enabled

    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)")
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = tiny_config(tmp_path, batch_size=4, eval_size=4, kl_coef=0.1, device=device)
    trainer = make_trainer(config)
    trainer.run_dir = config.run_dir
    record = trainer.train_step(0)
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")
    reference = make_trainer(config)
    reference.run_dir = config.run_dir
    expected = reference.train_step(0)
    for key in ("reward/sampled", "reward/greedy", "loss/pg_loss", "loss/logprob_mean", "grad_norm", "kl"):
        assert math.isclose(record[key], expected[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_rollout_train_mismatch_is_measured_and_tis_corrects_it(tmp_path):
    """Every step logs the rollout's log-probs against the training forward's on the same tokens (fp32 on the CPU:
    different kernels, nearly equal), and rollout_correction='tis' caps the importance weights."""
    plain = make_trainer(tiny_config(tmp_path / "a")).train_step(0)
    for key in ("mismatch/logprob_abs_diff", "mismatch/logprob_abs_diff_max", "mismatch/is_ratio",
                "mismatch/is_ratio_std"):
        assert math.isfinite(plain[key]), key
    assert plain["mismatch/logprob_abs_diff_max"] < 1e-3
    assert abs(plain["mismatch/is_ratio"] - 1) < 1e-3
    assert "mismatch/is_clipped" not in plain
    tis = make_trainer(tiny_config(tmp_path / "b", rollout_correction="tis", tis_cap=1.5)).train_step(0)
    assert tis["mismatch/is_clipped"] == 0.0  # ratios ~1: nothing capped
    assert math.isclose(tis["loss/pg_loss"], plain["loss/pg_loss"], rel_tol=1e-3, abs_tol=1e-5)
    with pytest.raises(ValueError, match="tis_cap"):
        tiny_config(tmp_path, tis_cap=0.0).validate()
    with pytest.raises(ValueError, match="rollout_correction"):
        tiny_config(tmp_path, rollout_correction="is").validate()
