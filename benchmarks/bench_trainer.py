"""End-to-end ReMax step: ``remax.Trainer.train_step`` on a ~0.5B policy, against the same step with eager logits.

The policy is Qwen2-0.5B-shaped (the ``generate`` family's config: 24 layers, hidden 896, V=151936, tied
embeddings) with random weights, fp32 master weights under bf16 autocast, as the trainer runs on a GPU. The task is
programmatic: prompts are random token strings of 64-128 tokens, the reward is the fraction of even token ids in the
response (read from the token ids, so no text model is involved). One step = ``generate_pairs`` for 32 prompts (32
sampled + 32 greedy responses of 256 tokens, top-p 0.9), rewards, ReMax advantages with the k1 KL to a frozen copy
of the policy in the reward (kl_coef 0.05, as the paper), the loss and its backward, one AdamW step.

Baseline ``eager_logits_loss``: the same trainer and step, except that the loss takes the model's full logits
(``model(...).logits``, fp32 ``log_softmax``, ``gather``, then ``policy_loss``): what a trainer without fused
kernels does. Each variant is measured with only its own trainer alive (policy, reference and AdamW states), so
the peak memories compare like for like. Reported besides time and peak memory: generated tokens per second and the
step's split into rollout / reward / train seconds, from the trainer's own metrics.
"""

from __future__ import annotations

import functools
import gc
import tempfile

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import bench_generate
from benchmarks import harness as hz
from remax import TrainConfig
from remax.trainer import Trainer
from remax_kernels.hf import position_ids_from_attention_mask

FAMILY = "trainer"
SHAPES = bench_generate.SHAPES  # the generate family's rollout, inside a whole step
# Token ids 0-2 are special; the rest are "t<id>", so a response decodes to text and back without loss.
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
N_PROMPTS = 256


def case_name(batch: int, new_tokens: int) -> str:
    return f"ReMax train_step B={batch} new_tokens={new_tokens}"


def word_tokenizer(vocab_size: int):
    """A word-level HF fast tokenizer over ``<pad> <eos> <unk> t3 t4 ... t{V-1}`` (built in code, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", truncation_side="left")


def even_token_reward(prompts, responses, *, prompt_ids=None, response_ids=None) -> torch.Tensor:
    """Fraction of the response's token ids that are even (0 for an empty response)."""
    return torch.tensor([sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in response_ids])


def random_prompts(n: int, lengths: tuple[int, int], vocab_size: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        out.append(" ".join(f"t{i}" for i in torch.randint(3, vocab_size, (length,), generator=gen).tolist()))
    return out


class EagerLogitsTrainer(Trainer):
    """The baseline: ``Trainer`` whose loss reads the model's materialized ``[B, L, V]`` logits."""

    def _policy_loss(self, model, ids, attention_mask, response_mask, advantages, ref_logprobs, rollout_logprobs,
                     old_logprobs=None):
        mask = attention_mask.long()
        positions = position_ids_from_attention_mask(mask)
        width = response_mask.shape[1]
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logp = bl.eager_token_logprobs(logits[:, -width - 1 : -1], ids[:, -width:],
                                       temperature=self.config.temperature)
        return rk.policy_loss(logp, advantages, response_mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                              rollout_logprobs=rollout_logprobs, options=self.loss_options)


def _build_trainer(kind: str, shapes: dict, s: hz.Settings, run_dir: str):
    transformers = bl.optional_import("transformers")
    if isinstance(transformers, str):
        raise hz.FamilySkipped(transformers)
    vocab = shapes["model"]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    config = transformers.Qwen2Config(**shapes["model"], pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(s.device):
        policy = transformers.Qwen2ForCausalLM(config)  # fp32 master weights; bf16 compute under autocast on CUDA
    train_config = TrainConfig(
        model=None, batch_size=shapes["B"], max_new_tokens=shapes["new_tokens"], max_prompt_length=shapes["prompt"][1],
        temperature=1.0, top_p=0.9, lr=1e-6, warmup_steps=0, kl_coef=0.05, chat_template=False, eval_size=8,
        device=s.device.type, bf16=True, progress=False, plot=False, save_every=0, save_final_model=False,
        run_dir=run_dir,
    )
    cls = {"ours": Trainer, "eager_logits_loss": EagerLogitsTrainer}[kind]
    prompts = random_prompts(N_PROMPTS, shapes["prompt"], vocab)
    return cls(policy, tokenizer, even_token_reward, config=train_config, prompts=prompts)


class _Steps:
    """Runs RL steps of one trainer variant at a time; switching variants frees the previous trainer first."""

    def __init__(self, shapes: dict, s: hz.Settings, run_dir: str):
        self.shapes, self.s, self.run_dir = shapes, s, run_dir
        self.kind, self.trainer, self.records = None, None, {}

    def get(self, kind: str):
        if self.kind != kind:
            self.trainer = None
            gc.collect()
            hz.free_memory(self.s)
            self.trainer = _build_trainer(kind, self.shapes, self.s, self.run_dir)
            self.kind = kind
        return self.trainer

    def step(self, kind: str) -> dict:
        trainer = self.get(kind)
        record = trainer.train_step(trainer.step)
        trainer.step += 1
        self.records.setdefault(kind, []).append(record)
        return record


def _loss_check(steps: _Steps) -> dict:
    """Both loss paths on one batch (our trainer's weights): the loss values and their absolute difference."""
    trainer = steps.get("ours")
    eager_loss = EagerLogitsTrainer._policy_loss
    vocab, batch, width = steps.shapes["model"]["vocab_size"], 2, 6
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, 3 * width), generator=gen).to(trainer.device)
    mask = torch.ones_like(ids)
    response_mask = torch.ones(batch, width, dtype=torch.bool, device=trainer.device)
    advantages = torch.tensor([0.5, -1.0], device=trainer.device)
    with torch.no_grad():
        ours, _ = trainer._policy_loss(trainer.policy, ids, mask, response_mask, advantages, None, None)
        eager, _ = eager_loss(trainer, trainer.policy, ids, mask, response_mask, advantages, None, None)
    return {"loss": float(ours), "loss_eager": float(eager), "abs_diff": abs(float(ours) - float(eager))}


def _summary(records: list[dict]) -> dict:
    """The last step's own metrics: where the time went, generation speed, mean sampled response length."""
    last = records[-1]
    keys = {"rollout_s": "perf/rollout_s", "reward_s": "perf/reward_s", "train_s": "perf/train_s",
            "generated_tokens_per_s": "perf/tokens_per_s", "response_length_sampled": "response_length/sampled"}
    return {name: last[key] for name, key in keys.items()}


# The columns of the case, "ours" first (see hz.ProviderFactory); each call is one real RL step of its variant.
PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, steps: lambda: steps.step("ours"),
    "eager_logits_loss": lambda s, steps: lambda: steps.step("eager_logits_loss"),
}


def specs(size: str) -> list[hz.CaseSpec]:
    shapes = SHAPES[size]
    return [hz.CaseSpec(
        family=FAMILY, size=size, name=case_name(shapes["B"], shapes["new_tokens"]), op="remax.Trainer.train_step",
        mode="rl_step", shape=bench_generate.rollout_shape(shapes), providers=tuple(PROVIDERS),
        build=functools.partial(_build, shapes=shapes),
    )]


def _build(s: hz.Settings, *, shapes: dict) -> hz.Case:
    run_dir = tempfile.TemporaryDirectory()
    steps = _Steps(shapes, s, run_dir.name)
    check = hz.check(lambda: _loss_check(steps))
    n_params = sum(p.numel() for p in steps.get("ours").policy.parameters())
    return hz.Case(
        calls=hz.provider_calls(PROVIDERS, s, steps),
        shape={"params": n_params},
        extra={"checks": check},
        provider_extra=lambda label, entry: {"step_split": _summary(steps.records[label])},
        # A step takes seconds: a fixed small number of calls (each is a real optimizer step).
        time_kw={} if s.smoke else {"warmup": 1, "reps": 3},
        close=run_dir.cleanup,
    )


def targets(cases: list[dict], size: str) -> list[dict]:
    shapes = SHAPES[size]
    case = hz.find_case(cases, case_name(shapes["B"], shapes["new_tokens"]))
    eager_ms = hz.baseline_ms(case, "eager_logits_loss")
    eager_peak, ours_peak = hz.peak_bytes(case, "eager_logits_loss"), hz.peak_bytes(case)
    # No number is set for the whole step; the fused loss must at least not cost time or memory end to end.
    return [
        hz.target("ReMax step: speedup over the same step with an eager-logits loss",
                  hz.ratio(eager_ms, hz.ours_ms(case)), 1.0, higher_is_better=True, unit="x"),
        hz.target("ReMax step: peak memory of the eager-logits step / ours",
                  hz.ratio(eager_peak, ours_peak), 1.0, higher_is_better=True, unit="x"),
    ]
