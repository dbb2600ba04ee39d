"""PPO in the trainer: GAE, whitening and the clipped value loss against float64 references, the sampled-only
rollout (remax_kernels.generate_samples) against generate_pairs, one PPO step's policy and value gradients against
a float64 recomputation from the formulas, mini-batch epochs, value models from a directory, model-state accounting
and resume."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from remax.config import TaskConfig, TrainConfig
from remax.data import build_char_tokenizer
from remax.distributed import DistInfo
from remax.model import build_tiny_llama
from remax.ppo import ValueModel, clipped_value_loss, gae_advantages, token_rewards, whiten_over_ranks
from tests.helpers.trainer_setup import make_trainer, tiny_config


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")


def _masks():
    # Ragged responses (ending at different lengths), one row with a masked hole, one with a single token.
    return torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0],
                         [1, 0, 0, 0, 0, 0]], dtype=torch.bool)


def _gae_reference(rewards, values, mask, gamma, lam):
    """GAE by its definition over each row's response tokens in order (float64 Python scalars)."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = float(values[b, t])
    return adv, (adv + values.double()) * mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0), (0.97, 0.8)])
def test_token_rewards_and_gae_match_reference(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    mask = _masks()
    score = torch.randn(5, generator=gen, dtype=torch.float64)
    kl = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    kl[~mask] = float("nan")  # padding garbage never reaches the result
    rewards = token_rewards(score, mask, token_kl=kl, kl_coef=0.3)
    expected = torch.where(mask, -0.3 * torch.nan_to_num(kl), 0.0)
    for b in range(5):
        last = max(t for t in range(6) if mask[b, t])
        expected[b, last] += score[b]
    assert torch.allclose(rewards, expected, rtol=0, atol=1e-12)

    values = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, rtol=1e-12, atol=1e-12) and torch.allclose(ret, ref_ret, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    if lam == 1.0 and gamma == 1.0:  # Monte-Carlo: the return is the reward-to-go, whatever the values
        assert torch.allclose(ret, torch.where(mask, rewards.flip(1).cumsum(1).flip(1), 0.0))


def test_whiten_is_verls_masked_whitening():
    gen = torch.Generator().manual_seed(1)
    mask = _masks()
    x = torch.randn(5, 6, generator=gen) * 3 + 2
    out = whiten_over_ranks(x, mask, DistInfo())
    values = x[mask].double()
    expected = (x.double() - values.mean()) / torch.sqrt(values.var(unbiased=True) + 1e-8)
    assert torch.allclose(out.double(), torch.where(mask, expected, 0.0), atol=1e-6)
    one_token = torch.zeros(1, 6, dtype=torch.bool)
    one_token[0, 0] = True
    with pytest.raises(ValueError, match="whiten"):
        whiten_over_ranks(x[:1], one_token, DistInfo())


@pytest.mark.parametrize("clip", [None, 0.2])
def test_clipped_value_loss_and_gradient(clip):
    gen = torch.Generator().manual_seed(2)
    mask = _masks()
    old = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    returns = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    values = (old + 0.4 * torch.randn(5, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=clip)
    loss.backward()
    n = mask.sum().double()
    v = values.detach()
    err = (v - returns) ** 2
    grad = v - returns
    if clip is not None:
        v_clip = old + (v - old).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        use_clip = err_clip > err
        inside = (v - old).abs() < clip
        assert 0 < float((use_clip & ~inside & mask).sum()) < float(n)  # both branches are exercised
        err = torch.maximum(err, err_clip)
        grad = torch.where(use_clip, torch.where(inside, v_clip - returns, 0.0), grad)
        cut = use_clip & ~inside & mask
        assert math.isclose(float(metrics["value_clip_frac"]), float(cut.sum() / n), rel_tol=1e-12)
    assert math.isclose(float(loss.detach()), float(0.5 * (err * mask).sum() / n), rel_tol=1e-12)
    assert torch.allclose(values.grad, grad * mask / n, atol=1e-12)


def test_sampled_rollout_is_the_sampled_half_of_generate_pairs():
    """The trainer's sampled-only rollouts (remax_kernels.generate_samples) are generate_pairs' sampled half."""
    import remax_kernels as rk

    tok = build_char_tokenizer()
    model = build_tiny_llama(tok, TaskConfig(hidden_size=32, layers=2, heads=2), seed=3)
    enc = tok([f"{i:02d}+{(7 * i) % 100:02d}=" for i in range(12)] + ["1+1="], padding=True, return_tensors="pt")
    seeds = torch.arange(13, dtype=torch.int64) * 7 + 3
    for options in (dict(temperature=1.0), dict(temperature=1.5, top_p=0.8), dict(temperature=0.7, top_k=3)):
        kw = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seeds,
                  **options)
        pairs = rk.generate_pairs(model, enc.input_ids, enc.attention_mask, **kw)
        alone = rk.generate_samples(model, enc.input_ids, enc.attention_mask, **kw)
        width = alone.sampled_ids.shape[1]
        R = width - alone.prompt_length
        assert alone.sampled_response_mask.any(1).all() and R >= 2
        assert torch.equal(pairs.sampled_ids[:, :width], alone.sampled_ids)
        assert not pairs.sampled_response_mask[:, R:].any()  # generate_pairs ran longer only for its greedy rows
        assert torch.equal(pairs.sampled_response_mask[:, :R], alone.sampled_response_mask)
        assert torch.equal(pairs.sampled_lengths, alone.sampled_lengths)
        assert torch.allclose(pairs.sampled_logprobs[:, :R], alone.sampled_logprobs, atol=1e-5)


def test_loss_options_clip_only_for_ppo():
    assert TrainConfig(estimator="ppo", clip_ratio_c=3.0).loss_options().clip_ratio == (0.2, 0.2)
    assert TrainConfig(estimator="ppo", clip_ratio_c=3.0).loss_options().clip_ratio_c == 3.0
    assert TrainConfig(estimator="remax", clip_ratio_c=3.0).loss_options().clip_ratio is None
    assert TrainConfig(estimator="remax", clip_ratio_c=3.0).loss_options().clip_ratio_c is None


# --- one PPO step against a float64 recomputation -------------------------------------------------------------


def _spy(trainer):
    """Capture the pre-step models, the rollout, the rewards and both optimizers' gradients of the next step."""
    captured = {"policy_grads": [], "value_grads": []}
    generate, reward_fn = trainer._generate, trainer.reward_fn

    def spy_generate(jobs, **kw):
        captured["policy"] = copy.deepcopy(trainer.policy)
        captured["value"] = copy.deepcopy(trainer.value_model)
        captured["rollout"] = generate(jobs, **kw)[0]
        return [captured["rollout"]]

    def spy_reward(prompts, responses, **kw):
        captured["rewards"] = reward_fn(prompts, responses, **kw)
        return captured["rewards"]

    def spy_step(optimizer, key):
        step = optimizer.step

        def wrapped(*a, **kw):
            captured[key].append([p.grad.clone() for p in optimizer.param_groups[0]["params"]])
            return step(*a, **kw)
        return wrapped

    trainer._generate, trainer.reward_fn = spy_generate, spy_reward
    trainer.optimizer.step = spy_step(trainer.optimizer, "policy_grads")
    trainer.critic_optimizer.step = spy_step(trainer.critic_optimizer, "value_grads")
    return captured


def _relative_error(got, expected) -> float:
    num = math.sqrt(sum(float((g.double() - e).square().sum()) for g, e in zip(got, expected, strict=True)))
    den = math.sqrt(sum(float(e.square().sum()) for e in expected))
    assert den > 0
    return num / den


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("case", ["kl-reward-accum", "kl-loss-clip-reward"])
def test_ppo_step_gradients_match_float64_reference(tmp_path, case):
    changes = dict(estimator="ppo", kl_coef=0.3, temperature=1.3, max_new_tokens=6, gamma=0.95, gae_lambda=0.9)
    changes.update(dict(grad_accum=2) if case == "kl-reward-accum" else dict(kl_penalty="loss", kl_estimator="k1",
                                                                                clip_reward=1.5))
    config = tiny_config(tmp_path, **changes)
    trainer = make_trainer(config)
    trainer.run_dir = config.run_dir
    trainer.train_step(0)  # at step 0 the policy is its reference (KL 0) and the value head is 0: take step 1
    captured = _spy(trainer)
    record = trainer.train_step(1)

    rollout = captured["rollout"]
    ids, attn, mask = rollout["sampled_ids"], rollout["sampled_attention_mask"], rollout["sampled_response_mask"]
    B, R = mask.shape
    m = mask.double()
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    policy = copy.deepcopy(captured["policy"]).double()
    logits = policy(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1 : -1]
    logp = torch.log_softmax(logits / config.temperature, -1).gather(-1, ids[:, -R:, None])[..., 0]
    with torch.no_grad():
        ref = copy.deepcopy(trainer.ref_runner.model).double()
        ref_logits = ref(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1 : -1]
        ref_logp = torch.log_softmax(ref_logits / config.temperature, -1).gather(-1, ids[:, -R:, None])[..., 0]
    old = rollout["sampled_logprobs"].double()

    # The value of the state predicting response token t: the backbone's hidden state just before it, then the head.
    value = copy.deepcopy(captured["value"]).double()
    hidden = value.backbone(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    values = (hidden[:, -R - 1 : -1] @ value.head.weight.T + value.head.bias)[..., 0]

    score = captured["rewards"].double()
    if config.clip_reward is not None:
        score = score.clamp(-config.clip_reward, config.clip_reward)
    rewards = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        rewards[b, int(m[b].sum()) - 1] = score[b]
    if config.kl_penalty == "reward":
        rewards = rewards - config.kl_coef * (old - ref_logp) * m
    adv, returns = _gae_reference(rewards, values.detach(), mask, config.gamma, config.gae_lambda)
    on = adv[mask]
    adv = (adv - on.mean()) / torch.sqrt(on.var() + 1e-8) * m

    n = m.sum()
    ratio = torch.exp(logp - old)  # ~1 at the first update: the clip is not active
    loss = (-adv * ratio * m).sum() / n
    if config.kl_penalty == "loss":
        loss = loss + config.kl_coef * ((logp - ref_logp) * m).sum() / n
    loss.backward()
    (0.5 * ((values - returns) ** 2 * m).sum() / n).backward()

    assert len(captured["policy_grads"]) == len(captured["value_grads"]) == 1
    assert _relative_error(captured["policy_grads"][0], [p.grad for p in policy.parameters()]) < 1e-4
    value_expected = [p.grad for p in value.parameters()]
    assert _relative_error(captured["value_grads"][0], value_expected) < 1e-4
    assert all(float(g.abs().sum()) > 0 for g in value_expected)  # backbone and head both learn
    assert math.isclose(record["value/returns_mean"], float((returns * m).sum() / n), rel_tol=1e-5)
    # Whitened with the unbiased variance; the record's std is the population one.
    assert abs(record["adv/mean"]) < 1e-6
    assert math.isclose(record["adv/std"], math.sqrt((n - 1) / n), rel_tol=1e-4)
    assert record["ppo/clip_frac"] == 0.0 and abs(record["ppo/approx_kl"]) < 1e-5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_ppo_epochs_and_mini_batches(tmp_path):
    config = tiny_config(tmp_path, estimator="ppo", ppo_epochs=3, ppo_mini_batch_size=4, lr=5e-2, grad_accum=2,
                         temperature=1.5, max_new_tokens=6, value_clip=0.05)
    trainer = make_trainer(config)
    trainer.run_dir = config.run_dir
    captured = _spy(trainer)
    record = trainer.train_step(0)
    # 3 passes x 2 mini-batches = 6 optimizer steps of each model; later ones see a moved policy: clipped ratios.
    assert len(captured["policy_grads"]) == len(captured["value_grads"]) == 6
    assert record["ppo/clip_frac"] > 0 and record["ppo/approx_kl"] != 0 and record["value/clip_frac"] > 0
    for key in ("value/loss", "value/mean", "value/grad_norm", "value/explained_variance", "grad_norm"):
        assert math.isfinite(record[key]), key
    # The rollout-train mismatch is measured at the first update only (before the policy moves).
    assert record["mismatch/logprob_abs_diff_max"] < 1e-3


# --- value models, model states, resume ---------------------------------------------------------------------


def test_value_model_from_a_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from remax.ppo import load_value_model

    tok = build_char_tokenizer()
    task = TaskConfig(hidden_size=32, layers=1, heads=2)
    build_tiny_llama(tok, task, seed=0).save_pretrained(tmp_path / "causal")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(cfg)
    reward_model.save_pretrained(tmp_path / "rm")

    from_rm = load_value_model(str(tmp_path / "rm"))
    assert torch.equal(from_rm.head.weight, reward_model.score.weight)  # a reward model's head is kept
    from_lm = load_value_model(str(tmp_path / "causal"))
    assert isinstance(from_lm, ValueModel) and not from_lm.head.weight.any()  # a causal LM gets a zero head
    ids = torch.tensor([[1, 5, 6, 14, 7, 15, 5]])
    assert from_rm(ids, torch.ones_like(ids), response_width=3).shape == (1, 3)
    with pytest.raises(ValueError, match="value_model"):
        load_value_model(str(tmp_path))

    trainer = make_trainer(tiny_config(tmp_path, estimator="ppo", value_model=str(tmp_path / "rm")))
    assert torch.equal(trainer.value_model.head.weight, reward_model.score.weight)


def test_model_states_are_counted_from_the_tensors(tmp_path):
    remax = make_trainer(tiny_config(tmp_path / "a", kl_coef=0.1))
    ppo = make_trainer(tiny_config(tmp_path / "b", estimator="ppo", kl_coef=0.1))
    for trainer in (remax, ppo):
        trainer.run_dir = str(tmp_path)
        trainer.train_step(0)
    n_policy = sum(p.numel() for p in remax.policy.parameters())
    n_value = sum(p.numel() for p in ppo.value_model.parameters())
    lm_head = remax.policy.get_output_embeddings().weight.numel()
    assert n_value == n_policy - lm_head + ppo.value_model.head.weight.numel() + 1  # backbone + head (+ bias)
    n_tensors = len(list(remax.policy.parameters()))
    # fp32: 4 bytes per value; AdamW: exp_avg and exp_avg_sq per value and a float32 step count per tensor.
    policy_states = {"params": 4 * n_policy, "grads": 4 * n_policy, "optimizer": 8 * n_policy + 4 * n_tensors}
    assert remax.model_states == {"policy": policy_states,
                                  "reference": {"params": 4 * n_policy, "grads": 0, "optimizer": 0}}
    n_value_tensors = len(list(ppo.value_model.parameters()))
    assert ppo.model_states["value"] == {"params": 4 * n_value, "grads": 4 * n_value,
                                         "optimizer": 8 * n_value + 4 * n_value_tensors}
    assert ppo.model_states["policy"] == policy_states
    assert remax.parameter_counts() == {"trainable": n_policy, "frozen": n_policy}
    assert ppo.parameter_counts() == {"trainable": n_policy + n_value, "frozen": n_policy}


def test_ppo_with_lora_trains_adapters_of_both_models(tmp_path):
    pytest.importorskip("peft")
    trainer = make_trainer(tiny_config(tmp_path, estimator="ppo", lora_r=4, lora_target_modules="q_proj,v_proj"))
    trainable = [n for n, p in trainer.value_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    trainer.run_dir = str(tmp_path)
    record = trainer.train_step(0)
    assert math.isfinite(record["grad_norm"]) and math.isfinite(record["value/grad_norm"])


def test_ppo_resume_continues_exactly(tmp_path):
    """The value model, its optimizer and schedule are part of the checkpoint: 2 steps + resume to 3 = 3 steps."""
    changes = dict(estimator="ppo", steps=3, save_every=1, kl_coef=0.1, ppo_mini_batch_size=4, eval_every=0)
    full = tiny_config(tmp_path / "a", **changes)
    make_trainer(full).train()
    part = tiny_config(tmp_path / "b", **dict(changes, steps=2))
    make_trainer(part).train()
    make_trainer(part.replace(steps=3, resume=part.run_dir)).train()

    def records(run):
        with open(os.path.join(run, "metrics.jsonl")) as fh:
            return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in fh]

    a, b = records(full.run_dir), records(part.run_dir)
    # The 2-step run evaluated at step 2 (its end) and the resumed one again at 3; the training records are equal.
    assert [r for r in a if r["split"] == "train"] == [r for r in b if r["split"] == "train"]
    assert a[-1] == b[-1]
    wa = load_file(os.path.join(full.run_dir, "final", "model.safetensors"))
    wb = load_file(os.path.join(part.run_dir, "final", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A PPO run evaluates like any other (its final/ is the policy; no value model is built for that).
    from remax.cli import main

    assert main(["eval", full.run_dir, "--progress", "false"]) == 0
