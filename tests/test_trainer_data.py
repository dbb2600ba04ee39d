"""remax.data (tokenizer, addition task, prompt files) and remax.rewards (validation, loading)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from remax.data import (
    addition_demonstrations,
    addition_problems,
    addition_reward,
    addition_score,
    addition_task,
    build_char_tokenizer,
    carry_dropped_sum,
    format_prompts,
    load_jsonl_prompts,
    tokenize_prompts,
)
from remax.rewards import RewardError, RewardFunction, check_reward_output, import_callable, load_reward


def test_char_tokenizer_roundtrip_and_left_padding():
    tok = build_char_tokenizer()
    assert len(tok) == 16 and tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok("012+987=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 9
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "012+987="
    ids, mask = tokenize_prompts(tok, ["1+2=", "11+22="], max_length=64, templated=False)
    assert ids.dtype == torch.int64 and ids.shape == (2, 7)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    ids, mask = tokenize_prompts(tok, ["123+456="], max_length=4, templated=False)
    assert tok.decode(ids[0]) == "<bos>56="  # cut on the left, keeping <bos>: the end of a prompt matters most


def test_addition_score_partial_credit():
    assert addition_score("057+068=", "0125") == 1.0
    assert addition_score("057+068=", "0015") == 0.5  # the carry-dropped answer keeps 2 of 4 digits
    assert addition_score("057+068=", "125") == 0.75  # right digits, missing the leading zero: not exact
    assert addition_score("057+068=", "") == 0.0
    assert addition_score("057+068=", "01+5") == 0.0
    assert addition_score("999+001=", "1000") == 1.0
    assert 0.0 < addition_score("999+001=", "0990") < 1.0
    out = addition_reward(["057+068=", "100+200="], ["0125", "0300"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 1.0]


def test_carry_dropped_demonstrations():
    assert carry_dropped_sum(57, 68) == 15 and carry_dropped_sum(999, 1) == 990 and carry_dropped_sum(12, 34) == 46
    problems = addition_problems(2000, digits=3, seed=0)
    assert len(set(problems)) == 2000
    prompts, answers = addition_demonstrations(problems, digits=3, error_rate=0.6, seed=0)
    carrying = [(a, b) for a, b in problems if carry_dropped_sum(a, b) != a + b]
    wrong = sum(int(ans) != a + b for (a, b), ans in zip(problems, answers, strict=True))
    # Only carrying problems can be wrong, each with probability 0.6: binomial, 5 sigma.
    n = len(carrying)
    assert abs(wrong - 0.6 * n) < 5 * (n * 0.24) ** 0.5
    for (a, b), ans in zip(problems, answers, strict=True):
        assert int(ans) in (a + b, carry_dropped_sum(a, b)) and len(ans) == 4


def test_task_split_is_disjoint_and_deterministic():
    t1 = addition_task(digits=2, train_size=500, eval_size=100, error_rate=0.5, seed=3)
    t2 = addition_task(digits=2, train_size=500, eval_size=100, error_rate=0.5, seed=3)
    assert t1["train_prompts"] == t2["train_prompts"] and t1["demo_answers"] == t2["demo_answers"]
    assert not set(t1["train_prompts"]) & set(t1["eval_prompts"])
    with pytest.raises(ValueError, match="task.train_size"):
        addition_problems(200, digits=1, seed=0)


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "a?"}) + "\n\n" + json.dumps({"question": "b?"}) + "\n")
    assert load_jsonl_prompts(str(path), field="question") == ["a?", "b?"]
    with pytest.raises(ValueError, match="prompt_field.*'prompt'"):
        load_jsonl_prompts(str(path))
    path.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        load_jsonl_prompts(str(path))
    # Issue 9, bug 11: json's message alone ends mid-sentence ("Invalid control character at"): add the column.
    path.write_text('{"prompt": "a\tb", "x": "unterminated\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1 is not valid JSON \(.* at column \d+\)$"):
        load_jsonl_prompts(str(path))


def test_chat_template_is_applied_when_present():
    tok = build_char_tokenizer("0123456789+=ua:|")
    assert format_prompts(tok, ["1+1="]) == ["1+1="]
    tok.chat_template = ("{% for m in messages %}u:{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    assert format_prompts(tok, ["1+1="]) == ["u:1+1=|a:"]
    assert format_prompts(tok, ["1+1="], chat_template=False) == ["1+1="]


# --- rewards ------------------------------------------------------------------------------------------------------


def test_check_reward_output():
    assert check_reward_output([1, 2.5], 2, "r").tolist() == [1.0, 2.5]
    assert check_reward_output(torch.ones(3, dtype=torch.float64), 3, "r").dtype == torch.float32
    with pytest.raises(RewardError, match=r"my_reward returned shape \(3,\) for 2"):
        check_reward_output(torch.ones(3), 2, "my_reward")
    # Issue 9, bug 10: a [B, 1] column was squeezed silently; the contract is [B].
    with pytest.raises(RewardError, match=r"shape \(3, 1\) for 3 responses; expected \[3\] \(squeeze"):
        check_reward_output(torch.ones(3, 1), 3, "r")
    with pytest.raises(RewardError, match="1 NaN"):
        check_reward_output(torch.tensor([1.0, float("nan")]), 2, "r")
    with pytest.raises(RewardError, match="first: prompt '2\\+2=', response 'x'"):
        check_reward_output(torch.tensor([1.0, float("inf")]), 2, "r", prompts=["1+1=", "2+2="], responses=["2", "x"])
    with pytest.raises(TypeError, match="float tensor"):
        check_reward_output("high", 2, "r")
    with pytest.raises(TypeError, match="dtype"):
        check_reward_output(torch.ones(2, dtype=torch.bool), 2, "r")


def _reward_with_ids(prompts, responses, *, prompt_ids, response_ids):
    return torch.tensor([float(len(p) + len(r)) for p, r in zip(prompt_ids, response_ids, strict=True)])


def test_reward_function_passes_token_ids_when_accepted():
    fn = RewardFunction(_reward_with_ids, name="ids")
    out = fn(["a", "b"], ["x", "y"], prompt_ids=[[1, 2], [3]], response_ids=[[4], [5, 6, 7]])
    assert out.tolist() == [3.0, 4.0]
    plain = RewardFunction(lambda p, r: [0.5] * len(p), name="plain")
    assert plain(["a"], ["b"], prompt_ids=[[1]], response_ids=[[2]]).tolist() == [0.5]
    with pytest.raises(ValueError, match="shape"):
        RewardFunction(lambda p, r: torch.zeros(len(p) + 1), name="bad").probe(["a", "b"])


def test_import_callable(tmp_path):
    assert import_callable("remax.data:addition_reward") is addition_reward
    file = tmp_path / "my_rewards.py"
    file.write_text("def score(prompts, responses):\n    return [1.0] * len(prompts)\n")
    assert import_callable(f"{file}:score")(["a"], ["b"]) == [1.0]
    for spec, needle in (("nocolon", "module:function"), ("remax_nope:f", "cannot import.*'path/to/file.py:f'"),
                         ("remax.data:nope", "no attribute"), ("remax.data:TASK_CHARS", "not callable")):
        with pytest.raises((ValueError, TypeError), match=needle):
            import_callable(spec)


def test_import_callable_finds_modules_in_the_current_folder(tmp_path, monkeypatch):
    """Issue 9, bug 3: the `remax` console script's sys.path lacks the current folder (python -m has it)."""
    (tmp_path / "my_reward_mod9.py").write_text("def fn(prompts, responses):\n    return [2.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    path_before = list(sys.path)
    assert import_callable("my_reward_mod9:fn")(["a"], ["b"]) == [2.0]
    assert sys.path == path_before  # the current folder is searched, not left on sys.path


def test_sequence_classifier_reward_from_local_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"), device=torch.device("cpu"))
    out = reward(["12+3=", "1+1="], ["15", "2"])
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out[0] != out[1]
    # Issue 9, bug 10: a classifier with 3 labels is not a reward model (logit 0 was used silently).
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm3")
    tok.save_pretrained(tmp_path / "rm3")
    with pytest.raises(ValueError, match="has 3 labels; a reward model scores each sequence with one number"):
        load_reward(str(tmp_path / "rm3"), device=torch.device("cpu"))
