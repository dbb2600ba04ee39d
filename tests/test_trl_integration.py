"""remax_kernels.integrations.trl against the real TRL: ReMaxTrainer trains, its baseline is greedy decoding, its
advantages are r(sampled) - r(greedy) through remax_advantages; use_remax_kernels gives TRL's own GRPO / RLOO
log-probs, losses, metrics and gradients; the patched log-prob step's peak memory does not grow with B x T x V.

Everything runs on the CPU with tiny Llamas built from configs and a character tokenizer built in code; model
"paths" are temporary directories (TRL builds reference and reward models from paths). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import huggingface_hub.constants
import pytest
import torch
import transformers

# TRL, datasets and peft are optional (the `trl` extra); the GPU machine's image has none of them. Without them the
# module is skipped with the reason, instead of stopping the whole collection.
trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'remax-kernels[trl]')")
Dataset = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'remax-kernels[trl]')").Dataset
peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

import remax_kernels as rk  # noqa: E402
import remax_kernels.integrations.trl as rk_trl  # noqa: E402
from remax_kernels.hf import causal_lm_logprobs  # noqa: E402
from remax_kernels.integrations.trl import (  # noqa: E402
    ReMaxConfig,
    ReMaxTrainer,
    check_trl_version,
    use_remax_kernels,
)

# TRL trainers send telemetry from their constructor unless the hub is offline; these tests must not reach the
# network. The environment covers subprocesses, the constants this process (huggingface_hub read them at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
huggingface_hub.constants.HF_HUB_OFFLINE = True
huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True

CHARS = "abcdefghij"
PROMPTS = ["abc", "hag", "fedcb", "bead", "j", "cafe", "iiij", "gab"]
ATOL, RTOL = 1e-5, 1e-4


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character of CHARS plus <pad>=0, <bos>=1 (prepended), <eos>=2, <unk>=3; left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )


def tiny_llama_config(tokenizer, **overrides) -> transformers.LlamaConfig:
    # initializer_range 0.2 (as tests/helpers/tiny_models.py): clear top-1 gaps, so greedy decoding has no ties.
    options = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    options.update(overrides)
    return transformers.LlamaConfig(**options)


def tiny_llama(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(tiny_llama_config(tokenizer)).float()


def length_and_a_reward(completions, **kwargs) -> list[float]:
    """TRL's reward convention: strings in, one float per completion out."""
    return [len(c) / 8 + c.count("a") for c in completions]


def common_args(output_dir, **overrides) -> dict:
    args = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_completion_length=8, max_steps=1,
        learning_rate=1e-2, bf16=False, use_cpu=True, activation_checkpointing=False, save_strategy="no",
        logging_steps=1, disable_tqdm=True, report_to=[], seed=0,
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    """A saved tiny policy (with its tokenizer): TRL builds reference models from the policy's path."""
    path = tmp_path_factory.mktemp("policy")
    tiny_llama(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny sequence-classification reward model, passed to TRL by path as TRL users pass hub ids."""
    path = tmp_path_factory.mktemp("reward_model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = transformers.LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_dataset(repeat: int = 1) -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS * repeat})


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --- version check and no global patching ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.0.post1"])
def test_supported_versions_pass(version):
    check_trl_version(version)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "1.17.0.dev0", "2.0.0", "0.19.1", "not-a-version"])
def test_unsupported_versions_name_the_range(version):
    with pytest.raises(ImportError, match=r">=1\.16,<1\.17"):
        check_trl_version(version)


def test_installed_trl_is_supported():
    check_trl_version(trl.__version__)


def test_import_checks_the_trl_version(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"found trl 1\.17\.0"):
        importlib.reload(rk_trl)  # fails at the version check, before any class is redefined


def test_import_patches_nothing_global(tokenizer, tmp_path):
    """Importing the integration leaves TRL's classes and a fresh trainer untouched."""
    assert trl.GRPOTrainer._get_per_token_logps_and_entropies.__module__ == "trl.trainer.grpo_trainer"
    assert trl.GRPOTrainer._compute_loss.__module__ == "trl.trainer.grpo_trainer"
    assert trl.RLOOTrainer._get_per_token_logps_and_entropies.__module__ == "trl.trainer.rloo_trainer"
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer), reward_funcs=length_and_a_reward,
        args=trl.GRPOConfig(**common_args(tmp_path, num_generations=2)), train_dataset=train_dataset(),
        processing_class=tokenizer,
    )
    assert "_compute_loss" not in vars(trainer) and "_get_per_token_logps_and_entropies" not in vars(trainer)
    assert not getattr(trainer.model, "_remax_kernels_forward", False)
    use_remax_kernels(trainer)
    assert "_get_per_token_logps_and_entropies" in vars(trainer) and "_compute_loss" in vars(trainer)
    assert trainer.model._remax_kernels_forward
    # Only that instance: the class and another trainer are still TRL's.
    assert trl.GRPOTrainer._compute_loss.__module__ == "trl.trainer.grpo_trainer"


def test_use_remax_kernels_rejects_bad_input(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="trainer"):
        use_remax_kernels(object())
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer), reward_funcs=length_and_a_reward,
        args=trl.GRPOConfig(**common_args(tmp_path, num_generations=2)), train_dataset=train_dataset(),
        processing_class=tokenizer,
    )
    with pytest.raises(TypeError, match="fused_loss"):
        use_remax_kernels(trainer, fused_loss=1)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_generations": 4}, "num_generations"),
        ({"per_device_train_batch_size": 3, "steps_per_generation": 2}, "per_device_train_batch_size"),
        ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
        ({"loss_type": "dapo"}, "loss_type"),
        ({"scale_rewards": "group"}, "scale_rewards"),
        ({"gamma": 0.0}, "gamma"),
        ({"clip_reward": -1.0}, "clip_reward"),
        ({"kl_mode": "all"}, "kl_mode"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"cache_implementation": "hybrid"}, "cache_implementation"),
    ],
)
def test_remax_config_refuses_what_remax_cannot_do(tmp_path, overrides, field):
    args = common_args(tmp_path, per_device_train_batch_size=4)
    args.update(overrides)
    with pytest.raises(ValueError, match=field):
        ReMaxConfig(**args)


def test_remax_trainer_wants_a_remax_config(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="ReMaxConfig"):
        ReMaxTrainer(model=tiny_llama(tokenizer), reward_funcs=length_and_a_reward,
                     args=trl.GRPOConfig(**common_args(tmp_path, num_generations=2)), processing_class=tokenizer,
                     train_dataset=train_dataset())


# --- ReMaxTrainer -----------------------------------------------------------------------------------------------------


class _LogRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _instrument(trainer, record: dict) -> None:
    """Check, at every rollout, that the greedy completions are what Hugging Face greedy decoding gives, and keep
    each scored batch with the rewards TRL computed for it."""
    generate = trainer._generate_single_turn
    score = trainer._generate_and_score_completions

    def generate_and_compare(prompt_ids, *args, **kwargs):
        completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
        prompts = prompt_ids[0::2]
        input_ids, attention_mask = left_pad(prompts, trainer.processing_class.pad_token_id)
        with torch.no_grad():
            out = trainer.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=trainer.max_completion_length,
                do_sample=False, eos_token_id=trainer.eos_token_ids, pad_token_id=trainer.processing_class.pad_token_id,
            )
        expected = []
        for row in out[:, input_ids.shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in trainer.eos_token_ids]
            expected.append(row[: ends[0] + 1] if ends else row)
        record.setdefault("greedy", []).append((completion_ids[1::2], expected))
        record.setdefault("sampled", []).append(completion_ids[0::2])
        return completion_ids, logprobs

    def score_and_keep(inputs):
        output = score(inputs)
        record.setdefault("batches", []).append((output, trainer._remax_rewards_per_func.clone()))
        return output

    trainer._generate_single_turn = generate_and_compare
    trainer._generate_and_score_completions = score_and_keep


@pytest.fixture
def torch_backend(monkeypatch):
    """The ops' CPU torch implementations: these tests check the trainer's wiring; the Triton kernels behind the same
    ops are checked against float64 references in the op tests (the interpreter would spend ~2 s per decode step)."""
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")


def test_remax_trainer_trains_with_greedy_baseline(tokenizer, reward_model_dir, tmp_path, torch_backend):
    """Two steps with a callable and a reward-model path (weighted): greedy rows are greedy decoding, advantages are
    r(sampled) - r(greedy) of the weighted reward, parameters move, TRL's logs, callbacks and checkpoints work."""
    model = tiny_llama(tokenizer)
    recorder = _LogRecorder()
    args = ReMaxConfig(**common_args(
        tmp_path, max_steps=2, temperature=1.3, top_p=0.95, reward_weights=[1.0, 0.5], save_strategy="steps",
        save_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
    ))
    trainer = ReMaxTrainer(
        model=model, reward_funcs=[length_and_a_reward, reward_model_dir], args=args,
        train_dataset=train_dataset(2), eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    record: dict = {}
    _instrument(trainer, record)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()

    assert len(record["greedy"]) == 4  # 2 training rollouts, 2 evaluation batches
    for greedy, expected in record["greedy"]:
        assert greedy == expected
    assert any(s != g for sampled, (greedy, _) in zip(record["sampled"], record["greedy"], strict=True)
               for s, g in zip(sampled, greedy, strict=True)), "sampling at temperature 1.3 never left the greedy path"

    weights = torch.tensor([1.0, 0.5])
    for output, rewards_per_func in record["batches"]:
        rewards = rewards_per_func @ weights
        assert output["completion_ids"].shape[0] == rewards.shape[0] // 2  # the sampled rows; greedy ones dropped
        torch.testing.assert_close(output["advantages"], rewards[0::2] - rewards[1::2])
        assert rewards_per_func[:, 1].std() > 0  # the reward model really scored the completions

    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed after two ReMax steps"
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 2
    for log in step_logs:
        for key in ("remax/reward_sampled", "remax/reward_greedy", "remax/advantage_mean", "reward",
                    "rewards/length_and_a_reward/mean", "completions/mean_length"):
            assert key in log and log[key] == log[key], key
    assert any("eval_remax/reward_greedy" in log for log in recorder.logs)
    assert list(trainer._logs["extra"]["baseline"]) == ["sampled", "greedy"] * 4

    # Resuming from TRL's checkpoint continues the run.
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, "trainer_state.json"))
    resumed = ReMaxTrainer(
        model=tiny_llama(tokenizer), reward_funcs=[length_and_a_reward, reward_model_dir],
        args=ReMaxConfig(**common_args(tmp_path, max_steps=3, reward_weights=[1.0, 0.5])),
        train_dataset=train_dataset(2), processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 3
    assert use_remax_kernels(resumed) is resumed  # a ReMaxTrainer already runs on the kernels


def test_remax_trainer_lora_kl_in_reward(tokenizer, policy_dir, tmp_path, torch_backend):
    """PEFT (LoRA) with the official ReMax options: KL shaping of the advantage from the rollout's k1 KL to the
    adapter-free reference, gamma 0.99, clipped reward difference. The advantages equal remax_advantages of the
    trainer's rewards and of independently recomputed log-probs; only the adapter trains."""
    args = ReMaxConfig(**common_args(
        tmp_path, max_steps=2, learning_rate=5e-2, beta=0.1, kl_in_reward=True, kl_mode="one-step", gamma=0.99,
        clip_reward=0.5,
    ))
    trainer = ReMaxTrainer(
        model=policy_dir, reward_funcs=length_and_a_reward, args=args, train_dataset=train_dataset(2),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # TRL's PEFT reference: the adapter disabled
    checked = []
    score = trainer._generate_and_score_completions

    def score_and_check(inputs):
        output = score(inputs)
        rewards = trainer._remax_rewards_per_func[:, 0]
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mask = output["completion_mask"]
        with torch.no_grad():
            old = causal_lm_logprobs(trainer.model, ids, attention, response_mask=mask, temperature=args.temperature)
            with trainer.model.disable_adapter():
                ref = causal_lm_logprobs(trainer.model, ids, attention, response_mask=mask,
                                         temperature=args.temperature)
        expected = rk.remax_advantages(
            rewards[0::2], rewards[1::2], response_mask=mask, token_kl=old - ref, kl_coef=0.1, gamma=0.99,
            clip_reward=0.5, kl_mode="one-step",
        )
        torch.testing.assert_close(output["advantages"], expected, atol=ATOL, rtol=RTOL)
        checked.append(float(((old - ref) * mask).abs().max()))
        return output

    trainer._generate_and_score_completions = score_and_check
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert len(checked) == 2 and checked[0] == 0.0 and checked[1] > 0  # step 2's policy differs from the reference
    assert all(torch.equal(p.detach(), base[n]) for n, p in trainer.model.named_parameters() if n in base)
    assert any(not torch.equal(p.detach(), lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
    assert "kl" in trainer.state.log_history[-2]


# --- use_remax_kernels: TRL's GRPO and RLOO, same batch, patched vs unpatched ----------------------------------------


def _weighted_logps_grads(trainer, batch):
    """Log-probs, entropies and the parameter gradients of a random per-token weighting of both (so every token's
    gradient is checked, not only a sum)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits_to_keep = batch["completion_ids"].shape[1]
    trainer.model.zero_grad(set_to_none=True)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attention, logits_to_keep, compute_entropy=True
    )
    gen = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(logps.shape, generator=gen), torch.randn(logps.shape, generator=gen)
    ((logps * w1).sum() + (entropies * w2).sum()).backward()
    return logps.detach(), entropies.detach(), _grads(trainer.model)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), _grads(trainer.model), metrics


def _assert_same(name, ours, theirs):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _compare_patched(trainer, batch, *, expect_fused: bool, monkeypatch):
    """TRL's log-probs, entropies, loss, metrics and gradients on ``batch``, then the same after
    ``use_remax_kernels``; they must agree, and the fused loss must have run exactly when expected."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    reference = _weighted_logps_grads(trainer, batch), _loss_and_grads(trainer, batch)

    calls = []
    fused = rk_trl.causal_lm_policy_loss
    monkeypatch.setattr(rk_trl, "causal_lm_policy_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    use_remax_kernels(trainer)
    patched = _weighted_logps_grads(trainer, batch), _loss_and_grads(trainer, batch)
    assert bool(calls) == expect_fused

    (lp0, ent0, g0), (loss0, lg0, m0) = reference
    (lp1, ent1, g1), (loss1, lg1, m1) = patched
    _assert_same("logps", lp1, lp0)
    _assert_same("entropies", ent1, ent0)
    assert g1.keys() == g0.keys()
    for n in g0:
        _assert_same(f"logp grad {n}", g1[n], g0[n])
    _assert_same("loss", loss1, loss0)
    assert lg1.keys() == lg0.keys()
    for n in lg0:
        _assert_same(f"loss grad {n}", lg1[n], lg0[n])
    # The fused loss logs every metric TRL logs, `entropy` included.
    assert set(m1) == set(m0)
    for key in m1:
        _assert_same(f"metric {key}", torch.tensor(m1[key]), torch.tensor(m0[key]))


def _scored_batch(trainer):
    trainer.model.train()
    inputs = [{"prompt": p} for p in PROMPTS[:4] for _ in range(trainer.num_generations)]
    batch = trainer._generate_and_score_completions(inputs)
    mask = batch["completion_mask"]
    assert (mask.sum(-1) < mask.shape[1]).any(), "no completion ended early: the masks are not exercised"
    assert batch["advantages"].abs().sum() > 0
    return batch


@pytest.mark.parametrize(
    ("config", "expect_fused"),
    [
        ({"loss_type": "grpo"}, True),
        ({"loss_type": "bnpo", "entropy_coef": 0.05}, True),
        ({"loss_type": "dr_grpo", "beta": 0.04, "use_bias_correction_kl": False}, True),
        ({"loss_type": "dapo", "beta": 0.04, "use_bias_correction_kl": False, "scale_rewards": "batch"}, True),
        # TRL's default KL (importance-weighted k3): the loss stays TRL's code on the kernels' log-probs.
        ({"loss_type": "dapo", "beta": 0.04}, False),
        # Off policy (old log-probs in the batch): TRL's code on the kernels' log-probs.
        ({"loss_type": "grpo", "num_iterations": 2}, False),
    ],
    ids=["grpo", "bnpo-entropy", "dr_grpo-kl", "dapo-kl", "dapo-bias-corrected-kl", "grpo-off-policy"],
)
def test_grpo_patched_equals_trl(tokenizer, policy_dir, tmp_path, monkeypatch, config, expect_fused):
    args = trl.GRPOConfig(**common_args(tmp_path, num_generations=2, temperature=1.2, **config))
    trainer = trl.GRPOTrainer(
        model=policy_dir, reward_funcs=length_and_a_reward, args=args, train_dataset=train_dataset(),
        processing_class=tokenizer,
    )
    batch = _scored_batch(trainer)
    assert ("old_per_token_logps" in batch) == (config.get("num_iterations", 1) > 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare_patched(trainer, batch, expect_fused=expect_fused, monkeypatch=monkeypatch)
    said_unfused = any("loss stays TRL's code" in str(w.message) for w in caught)
    assert said_unfused == ("beta" in config and "use_bias_correction_kl" not in config)


def test_rloo_patched_equals_trl(tokenizer, policy_dir, tmp_path, monkeypatch):
    args = trl.RLOOConfig(**common_args(tmp_path, num_generations=2, temperature=1.2, beta=0.05))
    trainer = trl.RLOOTrainer(
        model=policy_dir, reward_funcs=length_and_a_reward, args=args, train_dataset=train_dataset(),
        processing_class=tokenizer,
    )
    batch = _scored_batch(trainer)
    _compare_patched(trainer, batch, expect_fused=False, monkeypatch=monkeypatch)


def test_patched_grpo_trains(tokenizer, tmp_path, torch_backend):
    """A patched GRPO trainer runs TRL's own training loop (generation, rewards, logging) end to end."""
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer), reward_funcs=length_and_a_reward,
        args=trl.GRPOConfig(**common_args(tmp_path, num_generations=4, max_steps=2)), train_dataset=train_dataset(),
        processing_class=tokenizer,
    )
    use_remax_kernels(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["clip_ratio/region_mean"] == 0.0 for log in logs)


# --- memory of the log-prob step --------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import torch, transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from remax_kernels.integrations.trl import use_remax_kernels
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    V, PROMPT, COMPLETION = 32768, 8, 64
    # The trainer only reads the tokenizer's special tokens here: the batches are random token ids.
    specials = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(specials, unk_token="<unk>")), bos_token="<bos>",
        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left")
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=PROMPT + COMPLETION, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    args = GRPOConfig(output_dir=sys.argv[1], per_device_train_batch_size=2, num_generations=2, bf16=False,
                      use_cpu=True, activation_checkpointing=False, report_to=[])
    trainer = GRPOTrainer(model=transformers.LlamaForCausalLM(config), args=args, processing_class=tok,
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    use_remax_kernels(trainer)

    def rss(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def training_logprob_step(batch):
        # What TRL's training loss does first: per-token log-probs and entropies of the completions, then backward.
        ids = torch.randint(4, V, (batch, PROMPT + COMPLETION))
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, torch.ones_like(ids), COMPLETION, compute_entropy=True)
        (logps.sum() + entropies.sum()).backward()
        trainer.model.zero_grad(set_to_none=True)

    def eager_logits_step(batch):
        # The control: the same tokens through materialized [N, V] logits (what the kernels avoid).
        hidden = torch.randn(batch * COMPLETION, 16, requires_grad=True)
        logits = hidden @ trainer.model.lm_head.weight.T
        logits.log_softmax(-1).sum().backward()

    def peak(step, batch):
        step(2)  # first-call allocations out of the way
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
        before = rss("VmRSS")
        step(batch)
        return rss("VmHWM") - before

    small, large = int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps({name: [peak(step, small), peak(step, large)]
                      for name, step in (("kernels", training_logprob_step), ("eager", eager_logits_step))}))
    """
)


def test_logprob_step_peak_memory_does_not_grow_with_tokens_times_vocab(tmp_path):
    """Peak resident memory of the patched trainer's training log-prob step (forward + backward, with entropies) at
    V = 32768 for 2 and 8 completions of 64 tokens, with 4 MiB chunks of logits (``REMAX_KERNELS_CHUNK_MB``, 32
    rows): growing the batch by 384 tokens (a 48 MiB fp32 [N, V] buffer) must add well under one such buffer, and
    the peak must stay below the [N, V] logits alone; the eager control grows by at least one buffer (so the
    measure sees them). A fresh process; glibc's mmap threshold is fixed so that every large tensor is its own
    mapping, returned on free (by default glibc raises the threshold and keeps freed chunks resident, so RSS would
    lag the live memory)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, REMAX_KERNELS_BACKEND="torch", REMAX_KERNELS_CHUNK_MB="4", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the CPU path of the kernels (chunked torch), not the Triton interpreter
    small, large, completion, vocab = 2, 8, 64, 32768
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(small), str(large)], env=env, capture_output=True,
        text=True, timeout=300, cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    buffer = (large - small) * completion * vocab * 4  # one fp32 [N, V] buffer for the added tokens
    kernels_growth = peaks["kernels"][1] - peaks["kernels"][0]
    eager_growth = peaks["eager"][1] - peaks["eager"][0]
    assert eager_growth >= 0.9 * buffer, f"the control grew by {eager_growth / mib:.0f} MiB; the measure is blind"
    assert kernels_growth < 0.1 * buffer, (
        f"the kernels' log-prob step grew by {kernels_growth / mib:.1f} MiB for {buffer / mib:.0f} MiB of [N, V] "
        f"(peaks {[p / mib for p in peaks['kernels']]} MiB)"
    )
    logits = large * completion * vocab * 4
    assert peaks["kernels"][1] < logits, (
        f"peak {peaks['kernels'][1] / mib:.0f} MiB is not below the [N, V] logits ({logits / mib:.0f} MiB)"
    )


def test_remax_trainer_sum_norm_loss_divides_by_max_completion_length(tokenizer, tmp_path, torch_backend):
    """seq-mean-token-sum-norm: mean over completions of -sum_t A log pi(a_t), over max_completion_length (a
    constant, not the batch's padded width), recomputed in float64 from full logits."""
    args = ReMaxConfig(**common_args(tmp_path, temperature=1.3, loss_agg_mode="seq-mean-token-sum-norm",
                                     max_completion_length=12))
    trainer = ReMaxTrainer(model=tiny_llama(tokenizer), reward_funcs=[length_and_a_reward], args=args,
                           train_dataset=train_dataset(2), processing_class=tokenizer)
    record: dict = {}
    _instrument(trainer, record)
    trainer.train()
    batch = record["batches"][0][0]
    # The completions that ended before the budget, padded to their longest: a padded width below 12.
    lengths = batch["completion_mask"].sum(1)
    rows = lengths < 12
    width = int(lengths[rows].max())
    assert 1 <= rows.sum() < len(rows) and width < 12, "test design: need completions that ended early"
    inputs = {k: v[rows] for k, v in batch.items() if k != "num_items_in_batch"}
    assert inputs["advantages"].abs().sum() > 0, "test design: need a nonzero advantage"
    inputs["completion_ids"], inputs["completion_mask"] = (inputs[k][:, :width] for k in ("completion_ids",
                                                                                         "completion_mask"))
    trainer.model.eval()  # compute_loss scales training losses for gradient accumulation; eval losses are plain
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        logits = copy.deepcopy(trainer.model).double()(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, -width - 1:-1] / 1.3, -1).gather(-1, ids[:, -width:, None])[..., 0]
        m = inputs["completion_mask"].double()
        expected = (-inputs["advantages"].double()[:, None] * logp * m).sum(1).mean() / 12
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
