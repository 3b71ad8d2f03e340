"""The agent loop in token ids, with a scripted engine (a test double returning chosen ids).

Numbers checked: ``tokens`` = the rendered prompt + exactly the sampled ids + the template's
tool-response ids (built here independently, from a fresh environment's answers); the loss mask
is 1 on the sampled ids only and the log-probs are the engine's (a known function of the
position); the official template (jinja) renders ``messages`` to ``tokens``; the re-render check
passes on canonical samples and flags a non-canonical tokenisation; tool calls change the tool
environment's database and the reward equals a hand-computed one; malformed calls get an error
response and are counted; every limit stops with its finish reason; records go through the data
pipeline's parser, preprocessing and the GRPO reader with the same tokens and mask.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from megatron_a1.data.records import parse_record
from megatron_a1.data.render import render, render_prompt, render_tool_responses
from megatron_a1.data.tokenizer import load_tokenizer
from megatron_a1.envs import bundled_tasks, make
from megatron_a1.rollout.agent import (AgentConfig, RolloutStats, generation_header,
                                       group_rollouts, rerender_check, run_episodes)
from megatron_a1.rollout.engine import Generation, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T1 = ("Find ana's orders first.\n</think>\n\n<tool_call>\n<function=find_orders>\n"
      "<parameter=customer>\nana\n</parameter>\n</function>\n</tool_call><|im_end|>")
T2 = ("o1 is pending.\n</think>\n\nCancelling o1.\n\n<tool_call>\n<function=cancel_order>\n"
      "<parameter=order_id>\no1\n</parameter>\n</function>\n</tool_call><|im_end|>")
T3_HEAD, T3_ANSWER = "Done.\n</think>\n\n", "Order o1 is cancelled; its total was 30.5."
T3 = T3_HEAD + T3_ANSWER + "<|im_end|>"
CALL = "<tool_call>\n<function={}>\n<parameter={}>\n{}\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen")


@pytest.fixture(scope="module")
def task1():
    return next(t for t in bundled_tasks("tool") if t["id"] == "tool-1")


def lp(position: int) -> float:
    """The scripted engine's log-prob of the token it puts at ``position`` of the sequence."""
    return -(position + 1) / 1000


class ScriptedEngine:
    """Returns pre-chosen ids: ``scripts[key][turn]`` for the prompt whose text contains
    ``key`` (turn = assistant headers in the prompt - 1); honours stop ids and max_tokens."""

    def __init__(self, tok, scripts: dict[str, list[list[int]]], weight_version: int = 3):
        self.tok, self.scripts, self.weight_version = tok, scripts, weight_version
        self.calls: list[tuple[int, SamplingParams]] = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            key = next(k for k in self.scripts if k in text)
            turn = text.count("<|im_start|>assistant") - 1
            ids, finish = list(self.scripts[key][turn]), "length"
            for i, t in enumerate(ids):
                if t in sampling.stop_token_ids:
                    ids, finish = ids[:i + 1], "stop"
                    break
            if len(ids) > sampling.max_tokens:
                ids, finish = ids[:sampling.max_tokens], "length"
            out.append(Generation(token_ids=ids, logprobs=[lp(len(p) + i) for i in range(len(ids))],
                                  finish_reason=finish, weight_version=self.weight_version))
        return out


def run_one(tok, task, turns, cfg=None, **engine_kw):
    engine = ScriptedEngine(tok, {task["prompt"][:20]: turns}, **engine_kw)
    env = make("tool")
    (rec,) = run_episodes(engine, [(env, task)], tok, cfg or AgentConfig())
    return rec, env, engine


def fresh_answers(task, calls):
    """Tool responses of ``calls`` (name, args) from a fresh environment."""
    env = make("tool")
    env.reset(task)
    return [env.step({"function": {"name": n, "arguments": a}}) for n, a in calls]


def check_alignment(rec):
    n = len(rec["tokens"])
    assert len(rec["loss_mask"]) == n and len(rec["logprobs"]) == n
    for t, (m, x) in enumerate(zip(rec["loss_mask"], rec["logprobs"])):
        assert x == (lp(t) if m else 0.0)


# ---------------------------------------------------------------- canonical episode
def test_canonical_episode_tokens_mask_logprobs_reward(tok, task1):
    ids = [tok.encode(t) for t in (T1, T2, T3)]
    rec, env, engine = run_one(tok, task1, ids)
    env0 = make("tool")
    msgs0 = env0.reset(task1)
    prompt = render_prompt(msgs0, env0.tools(), tokenizer=tok)
    a1, a2 = fresh_answers(task1, [("find_orders", {"customer": "ana"}),
                                   ("cancel_order", {"order_id": "o1"})])
    tool1 = render_tool_responses([{"role": "tool", "content": a1}], tokenizer=tok)
    tool2 = render_tool_responses([{"role": "tool", "content": a2}], tokenizer=tok)
    expected = prompt + ids[0] + tool1 + ids[1] + tool2 + ids[2] + tok.encode("\n")
    assert rec["tokens"] == expected
    mask = [0] * len(prompt) + [1] * len(ids[0]) + [0] * len(tool1) + [1] * len(ids[1]) \
        + [0] * len(tool2) + [1] * len(ids[2]) + [0]
    assert rec["loss_mask"] == mask and rec["prompt_length"] == len(prompt)
    check_alignment(rec)
    # the environment saw the calls: the database changed, the reward is the hand-computed one
    assert env.db["orders"]["o1"]["status"] == "cancelled"
    assert env.db["orders"]["o2"]["status"] == "shipped"
    assert rec["rewards"] == {"outcome": 1.0, "process": 1.0, "components": {
        "state_match": 1.0, "answer_match": 1.0, "valid_calls": 2, "calls": 2}}
    # the messages are the parsed turns
    m = rec["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    call = {"name": "find_orders", "arguments": {"customer": "ana"}}
    assert m[1] == {"role": "assistant", "reasoning_content": "Find ana's orders first.",
                    "content": "", "tool_calls": [{"id": "call_0_0", "type": "function",
                                                   "function": call}]}
    assert m[2] == {"role": "tool", "tool_call_id": "call_0_0", "name": "find_orders",
                    "content": a1}
    assert m[3]["content"] == "Cancelling o1." and m[5]["content"] == T3_ANSWER
    assert rec["finish_reason"] == "stop" and rec["weight_version"] == {
        "min": 3, "max": 3, "turns": [3, 3, 3]}
    assert rec["stats"] == {"turns": 3, "tool_calls": 2, "tool_errors": 0, "malformed_calls": 0,
                            "argument_errors": 0, "ignored_text": 0,
                            "sampled_tokens": sum(map(len, ids)), "truncated_turn": False,
                            "rerender_exact": True, "retokenization_mismatch": 0,
                            "text_mismatch": 0, "context_mismatch": 0}
    # one engine call per turn, im_end is a stop id, max_tokens is the turn limit
    assert [n for n, _ in engine.calls] == [1, 1, 1]
    assert all(tok.im_end in sp.stop_token_ids and sp.max_tokens == 4096 for _, sp in engine.calls)


def test_non_canonical_tokenisation_is_kept_and_flagged(tok, task1):
    odd = tok.encode(T3_HEAD) + [i for c in "Order o1" for i in tok.encode(c)] \
        + tok.encode(T3_ANSWER[len("Order o1"):] + "<|im_end|>")
    assert odd != tok.encode(T3) and tok.decode(odd) == T3
    rec, _, _ = run_one(tok, task1, [tok.encode(T1), tok.encode(T2), odd])
    n = len(rec["tokens"])
    assert rec["tokens"][n - 1 - len(odd):n - 1] == odd  # the sampled ids, not the canonical ones
    assert rec["loss_mask"][n - 1 - len(odd):n - 1] == [1] * len(odd)
    check_alignment(rec)
    s = rec["stats"]
    assert (s["rerender_exact"], s["retokenization_mismatch"], s["text_mismatch"],
            s["context_mismatch"]) == (False, 1, 0, 0)
    assert rec["rewards"]["outcome"] == 1.0


def test_split_generation_of_a_turn_is_appended_exactly(tok, task1):
    """Sampled ids that split multi-byte characters are appended as they are; the turn parses."""
    text = "Nach Grüße 🚀 suchen.\n</think>\n\n" + CALL.format("find_orders", "customer", "ana") \
        + "<|im_end|>"
    raw = text.encode()
    cut = raw.index(b"\n</think>")
    u, rocket = raw.index("ü".encode()) + 1, raw.index("🚀".encode()) + 2
    pieces = [raw[:u], raw[u:rocket], raw[rocket:cut]]  # cuts inside "ü" and "🚀"
    ids = [i for piece in pieces for i in _bytes_to_ids(tok._enc, piece)]
    ids += tok.encode(raw[cut:].decode())
    assert tok.decode(ids) == text
    rec, env, _ = run_one(tok, task1, [ids, tok.encode(T3)])
    assert rec["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"customer": "ana"}
    assert rec["messages"][1]["reasoning_content"] == "Nach Grüße 🚀 suchen."
    assert rec["stats"]["retokenization_mismatch"] == 1 and rec["stats"]["text_mismatch"] == 0
    assert rec["tokens"][rec["prompt_length"]:rec["prompt_length"] + len(ids)] == ids


def _bytes_to_ids(enc, piece: bytes) -> list[int]:
    """Greedy longest-prefix tokens of a byte string (valid ids whatever the UTF-8 cuts)."""
    out, i = [], 0
    while i < len(piece):
        for j in range(len(piece), i, -1):
            try:
                out.append(enc.encode_single_token(piece[i:j]))
                i = j
                break
            except KeyError:
                continue
    return out


# ---------------------------------------------------------------- official template
def test_template_renders_the_records_messages_to_its_tokens(tok, task1, chat_template_path):
    """Past reasoning of a multi-turn tool episode is kept: every turn follows the one query."""
    from test_data_render import TemplateOracle

    oracle = TemplateOracle(chat_template_path)
    canonical, _, _ = run_one(tok, task1, [tok.encode(t) for t in (T1, T2, T3)])
    malformed, _, _ = run_one(tok, task1, malformed_script(tok))
    for rec in (canonical, malformed):
        text = oracle.text(rec["messages"], rec["tools"])
        # the malformed record's second turn lost its malformed call in the parse (counted)
        assert rec["stats"]["rerender_exact"] == (rec is canonical)
        (doc,) = render(rec["messages"], rec["tools"], tokenizer=tok)
        assert oracle.tokens(text) == doc.tokens
        if rec is canonical:
            assert doc.tokens == rec["tokens"]
        else:  # identical up to the malformed call the parse dropped
            first = next(t for t, (a, b) in enumerate(zip(doc.tokens, rec["tokens"])) if a != b)
            dropped = "\n<tool_call>\n<function=get_order>"
            assert tok.decode(rec["tokens"][first:]).startswith(dropped)
        for m in rec["messages"]:
            if m["role"] == "assistant" and "reasoning_content" in m:
                assert f"<think>\n{m['reasoning_content']}\n</think>" in text
    # the prompt of turn k is the template's rendering of the turns before it + the header
    rec = canonical
    k = rec["messages"].index(next(m for m in rec["messages"][2:] if m["role"] == "assistant"))
    head = oracle.text(rec["messages"][:k], rec["tools"], add_generation_prompt=True)
    assert rec["tokens"][:len(oracle.tokens(head))] == oracle.tokens(head)
    assert rec["loss_mask"][len(oracle.tokens(head))] == 1


# ---------------------------------------------------------------- malformed calls, tool errors
def malformed_script(tok):
    broken = ("<tool_call>\n<function=cancel_order>\n<parameter=order_id>\no1\n</function>\n"
              "</tool_call>")  # no </parameter>
    return [tok.encode(t) for t in (
        "Try cancelling.\n</think>\n\n" + broken + "<|im_end|>",
        "Again.\n</think>\n\n" + CALL.format("cancel_order", "order_id", "o2") + "\n"
        + broken.replace("cancel_order", "get_order") + "<|im_end|>",
        "Now o1.\n</think>\n\n" + CALL.format("cancel_order", "order_id", "o1") + "<|im_end|>",
        T3)]


def test_malformed_calls_get_error_responses_and_are_counted(tok, task1):
    rec, env, _ = run_one(tok, task1, malformed_script(tok))
    m = rec["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant", "tool", "tool",
                                      "assistant", "tool", "assistant"]
    # turn 1: every call malformed -> the raw text, then the error as a tool-response user turn
    assert "tool_calls" not in m[1] and m[1]["content"].startswith("<tool_call>")
    assert m[2]["content"].startswith("<tool_response>\nError: malformed tool call (")
    # turn 2: a valid call the state refuses (an environment error) and a malformed one
    assert m[4]["content"].startswith("Error: cancel_order needs status='pending'")
    assert m[5]["content"].startswith("Error: malformed tool call (") and "tool_call_id" not in m[5]
    text = tok.decode(rec["tokens"])
    assert text.count("<tool_response>\nError: malformed tool call (") == 2
    assert rec["stats"]["malformed_calls"] == 2 and rec["stats"]["tool_calls"] == 2
    assert rec["stats"]["tool_errors"] == 1 and rec["stats"]["turns"] == 4
    # turn 1 re-renders exactly (raw text); turn 2 lost its malformed call in the parse
    assert (rec["stats"]["text_mismatch"], rec["stats"]["retokenization_mismatch"],
            rec["stats"]["context_mismatch"]) == (1, 0, 0)
    assert env.db["orders"]["o1"]["status"] == "cancelled"
    # replay: cancel o2 (refused), cancel o1 (valid) -> process 1/2; goal state reached
    assert rec["rewards"]["outcome"] == 1.0 and rec["rewards"]["process"] == 0.5
    check_alignment(rec)
    parse_record(rec)


# ---------------------------------------------------------------- limits
def test_max_turns_ends_after_the_tool_responses(tok, task1):
    rec, _, _ = run_one(tok, task1, [tok.encode(t) for t in (T1, T2, T3)],
                        AgentConfig(max_turns=1))
    assert rec["finish_reason"] == "max_turns" and rec["stats"]["turns"] == 1
    assert tok.decode(rec["tokens"]).endswith("</tool_response><|im_end|>\n")
    assert rec["messages"][-1]["role"] == "tool" and rec["stats"]["rerender_exact"]


def test_turn_and_episode_token_limits(tok, task1):
    ids = [tok.encode(t) for t in (T1, T2, T3)]
    rec, _, eng = run_one(tok, task1, ids, AgentConfig(max_turn_tokens=5))
    assert rec["finish_reason"] == "length" and rec["stats"]["truncated_turn"]
    assert rec["tokens"][rec["prompt_length"]:] == ids[0][:5] and sum(rec["loss_mask"]) == 5
    assert rec["stats"]["rerender_exact"]  # the unfinished turn is left out of the check
    check_alignment(rec)
    rec, _, eng = run_one(tok, task1, ids, AgentConfig(max_tokens=len(ids[0]) + 3))
    assert rec["finish_reason"] == "max_tokens" and rec["stats"]["turns"] == 2
    assert rec["stats"]["sampled_tokens"] == sum(rec["loss_mask"]) == len(ids[0]) + 3
    assert eng.calls[1][1].max_tokens == 3
    assert rec["tokens"][-3:] == ids[1][:3]


def test_context_limit(tok, task1):
    ids = [tok.encode(t) for t in (T1, T2, T3)]
    full, _, _ = run_one(tok, task1, ids)
    second = full["loss_mask"].index(1, full["prompt_length"] + len(ids[0]))  # turn 2 starts
    limit = second + 3
    rec, _, _ = run_one(tok, task1, ids, AgentConfig(context_limit=limit))
    assert rec["finish_reason"] == "context_limit" and len(rec["tokens"]) <= limit
    assert rec["tokens"] == full["tokens"][:len(rec["tokens"])]
    assert rec["tokens"][-2:] == ids[1][:2]  # 3 left: 2 to sample, 1 kept for the closing "\n"
    # tool responses that do not fit: the calls ran, the record ends after the assistant turn
    limit = full["prompt_length"] + len(ids[0]) + 6
    rec, env, _ = run_one(tok, task1, ids, AgentConfig(context_limit=limit))
    assert rec["finish_reason"] == "context_limit" and rec["messages"][-1]["role"] == "assistant"
    assert rec["tokens"] == full["tokens"][:full["prompt_length"] + len(ids[0])] + tok.encode("\n")
    assert rec["stats"]["tool_calls"] == 1 and rec["stats"]["rerender_exact"]


def test_no_thinking_header_is_prompt_not_sampled(tok, task1):
    turns = [tok.encode(t.split("</think>\n\n", 1)[1]) for t in (T1, T2, T3)]
    rec, _, _ = run_one(tok, task1, turns, AgentConfig(enable_thinking=False))
    header = generation_header(tok, enable_thinking=False)
    assert tok.decode(header) == "<think>\n\n</think>\n\n"
    p = rec["prompt_length"]
    assert rec["tokens"][p - len(header):p] == header and rec["loss_mask"][p - 1] == 0
    assert rec["stats"]["rerender_exact"] and rec["rewards"]["outcome"] == 1.0


# ---------------------------------------------------------------- batching, groups, stats
def test_groups_batch_across_episodes_with_distinct_seeds(tok):
    tasks = {t["id"]: t for t in bundled_tasks("tool")}
    t1, t2 = tasks["tool-1"], tasks["tool-2"]
    final = tok.encode("Done.\n</think>\n\nThe address of o3 is now 42 Oak Ave.<|im_end|>")
    upd = tok.encode("Update it.\n</think>\n\n<tool_call>\n<function=update_address>\n"
                     "<parameter=order_id>\no3\n</parameter>\n<parameter=address>\n42 Oak Ave\n"
                     "</parameter>\n</function>\n</tool_call><|im_end|>")
    scripts = {t1["prompt"][:20]: [tok.encode(t) for t in (T1, T2, T3)],
               t2["prompt"][:20]: [upd, final]}
    engine = ScriptedEngine(tok, scripts)
    groups = group_rollouts(engine, {"tool": [t1, t2]}, 3, tok, AgentConfig())
    assert [[r["sample_index"] for r in g] for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert [g[0]["prompt_id"] for g in groups] == ["tool-1", "tool-2"]
    assert [n for n, _ in engine.calls] == [6, 6, 3]  # one call per turn, all live episodes
    assert all(r["rewards"]["outcome"] == 1.0 for g in groups for r in g)
    # with a seed: one call per sample index per turn, a distinct seed each
    engine = ScriptedEngine(tok, scripts)
    group_rollouts(engine, {"tool": [t1, t2]}, 3, tok, AgentConfig(seed=7))
    assert [n for n, _ in engine.calls] == [2] * 6 + [1] * 3
    assert len({sp.seed for _, sp in engine.calls}) == 9
    stats = RolloutStats.from_records([r for g in groups for r in g], seconds=2.0).as_dict()
    n_tok = sum(r["stats"]["sampled_tokens"] for g in groups for r in g)
    assert stats["tool"]["episodes"] == 6 and stats["tool"]["mean_outcome"] == 1.0
    assert stats["tool"]["mean_turns"] == 2.5 and stats["tool"]["tool_calls"] == 9
    assert stats["tool"]["tokens_generated"] == n_tok and stats["all"]["tokens_per_s"] == n_tok / 2
    assert "tool" in RolloutStats.from_records(groups[0]).table()


def test_engine_may_overshoot_a_smaller_budget(tok, task1):
    """A batched call uses the largest budget; each episode is cut to its own."""
    ids = [tok.encode(t) for t in (T1, T2, T3)]

    class Overshooting(ScriptedEngine):  # as if the batch had a larger budget
        def generate(self, prompts, sampling):
            return super().generate(prompts, replace(sampling, max_tokens=10**6))

    engine = Overshooting(tok, {task1["prompt"][:20]: ids})
    (rec,) = run_episodes(engine, [(make("tool"), task1)], tok, AgentConfig(max_turn_tokens=4))
    assert rec["finish_reason"] == "length" and sum(rec["loss_mask"]) == 4
    check_alignment(rec)


# ---------------------------------------------------------------- data pipeline round trip
def test_record_round_trips_through_preprocessing_and_grpo_reader(tok, task1, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_a1.data.preprocess import PreprocessConfig, preprocess
    from megatron_a1.training.rollout_groups import parse_rollout

    recs = [run_one(tok, task1, [tok.encode(t) for t in (T1, T2, T3)])[0],
            run_one(tok, task1, malformed_script(tok))[0]]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = preprocess(PreprocessConfig(inputs=[str(path)], tokenizer="qwen",
                                         output_prefix=str(tmp_path / "out"), progress=False),
                        tokenizer=tok)
    assert report["records_ok"] == 2 and report["documents_written"] == 2
    tokens, masks = IndexedDataset(str(tmp_path / "out")), \
        IndexedDataset(str(tmp_path / "out.loss_mask"))
    h = len(generation_header(tok))
    for i, rec in enumerate(recs):
        traj = parse_record(rec)
        assert traj.domain == "tool" and traj.id == "tool-1/0"
        if rec["stats"]["rerender_exact"]:
            assert tokens[i].tolist() == rec["tokens"]
            # the renderer also trains the generation header the rollout had in its prompt
            want = list(rec["loss_mask"])
            for t in range(1, len(want)):
                if want[t] and not want[t - 1]:
                    want[t - h:t] = [1] * h
            assert masks[i].tolist() == want
        sample = parse_rollout(rec, "x")
        assert sample.tokens.tolist() == rec["tokens"] and sample.mask.tolist() == rec["loss_mask"]
        assert np.allclose(sample.logprobs, rec["logprobs"])
        assert rerender_check(json.loads(json.dumps(rec)), tok)["rerender_exact"] == \
            rec["stats"]["rerender_exact"]


# ---------------------------------------------------------------- CLI
def test_cli_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rollout.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--samples-per-prompt" in out.stdout and "--engine" in out.stdout
