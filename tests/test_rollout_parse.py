"""``parse_assistant`` is the inverse of the official Qwen3.5 template's assistant rendering.

Oracle: the template itself, rendered by jinja through transformers' ``render_jinja_template``
(never our renderer). Properties over adversarial messages:

* ``template(parse(x)) == x`` for every ``x`` the template renders (any message);
* ``parse(template(m)) == m`` for canonical messages (trimmed text, schema-typed arguments);

plus hand-written malformed outputs with their expected structured errors.
"""
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megatron_a1.rollout import parse_assistant
from megatron_a1.rollout.parse import coerce_argument

TOOLS = [
    {"type": "function", "function": {
        "name": "f", "description": "typed tool",
        "parameters": {"type": "object", "properties": {
            "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
            "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": "array"},
            "u": {"type": ["string", "null"]}, "e": {"enum": ["x", "y"]}}}}},
    {"type": "function", "function": {
        "name": "search_web", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer"}}}}},
]

CHUNKS = ["a", "Z", " ", "\n", "\n\n", "<", ">", "/", "=", "{", "}", "[", "]", '"', "\\", "1",
          "0", ".", "-", "e", "é", "日本", "🙂", "\t", "42", "3.5", "True", "None", "null",
          "</parameter>", "<parameter=x>", "</function>", "<function=f>", "</tool_call>",
          '{"k": 1}', "[1, 2]"]
text = st.lists(st.sampled_from(CHUNKS), max_size=12).map("".join)
# content/reasoning: the template cannot render these unambiguously (documented in parse.py)
free_text = text.filter(lambda t: not any(s in t for s in ("<tool_call>", "<think>", "</think>")))

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                        st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_scalar, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(text, kids, max_size=3)), max_leaves=8)

TYPED = {
    "s": text, "i": st.integers(-10**15, 10**15),
    "n": st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False)),
    "b": st.booleans(), "o": st.dictionaries(text, json_value, max_size=3),
    "a": st.lists(json_value, max_size=3),
    "u": st.one_of(st.none(), text.filter(lambda t: t.strip() not in ("None", "null"))),
    "e": st.sampled_from(["x", "y"]),
}


@st.composite
def typed_call(draw):
    keys = draw(st.lists(st.sampled_from(sorted(TYPED)), unique=True, max_size=5))
    return {"type": "function", "function": {"name": "f",
                                             "arguments": {k: draw(TYPED[k]) for k in keys}}}


@st.composite
def untyped_call(draw):  # a tool without schema: values come back typed only if canonical
    args = draw(st.dictionaries(st.sampled_from(["p", "q", "long_name"]), json_value, max_size=3))
    return {"type": "function", "function": {"name": draw(st.sampled_from(["g", "other_tool"])),
                                             "arguments": args}}


def _format(v):  # how the template prints a value (independent of the code under test)
    import json
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def unambiguous(calls) -> bool:
    """No parameter value contains what ends a value (see parse.py: genuinely ambiguous)."""
    end = re.compile(r"</parameter>\n?[ \t\r\n]*(<parameter=|</function>)")
    for c in calls:
        for v in c["function"]["arguments"].values():
            s = _format(v) + "\n</parameter>\n</function>"
            m = end.search(s)
            if m.start() != len(_format(v)) + 1:
                return False
    return True


@pytest.fixture(scope="module")
def oracle(chat_template_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = open(chat_template_path).read()

    def assistant_text(message, with_think: bool, tools=TOOLS) -> str:
        """What the template renders after ``<|im_start|>assistant\\n`` up to ``<|im_end|>``."""
        before = [{"role": "user", "content": "question"}]
        after = [] if with_think else [{"role": "user", "content": "next question"}]
        render = lambda msgs: render_jinja_template([msgs], tools=tools,
                                                    chat_template=template)[0][0]
        prefix = render(before) + "<|im_start|>assistant\n"
        full = render(before + [message] + after)
        assert full.startswith(prefix)
        body = full[len(prefix):]
        end = body.rindex("<|im_end|>\n" + "".join(
            f"<|im_start|>user\n{m['content']}<|im_end|>\n" for m in after))
        return body[:end]

    return assistant_text


def roundtrip_message(msg, with_think):
    out = {"role": "assistant", "content": msg["content"],
           "tool_calls": msg["tool_calls"]}
    if msg["reasoning_content"] is not None:
        out["reasoning_content"] = msg["reasoning_content"]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(content=free_text, reasoning=st.one_of(st.none(), free_text), with_think=st.booleans(),
       calls=st.lists(st.one_of(typed_call(), untyped_call()), max_size=3))
def test_template_of_parse_is_identity(oracle, content, reasoning, with_think, calls):
    assume(unambiguous(calls))
    msg = {"role": "assistant", "content": content, "tool_calls": calls}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    x = oracle(msg, with_think)
    parsed = parse_assistant(x, TOOLS)
    assert parsed["errors"] == []
    assert oracle(roundtrip_message(parsed, with_think), with_think) == x


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(content=free_text, reasoning=free_text, with_think=st.booleans(),
       calls=st.lists(typed_call(), max_size=3))
def test_parse_of_template_is_identity(oracle, content, reasoning, with_think, calls):
    assume(unambiguous(calls))
    content, reasoning = content.strip(), reasoning.strip()
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning,
           "tool_calls": calls}
    parsed = parse_assistant(oracle(msg, with_think), TOOLS)
    assert parsed == {"reasoning_content": reasoning if with_think else None, "content": content,
                      "tool_calls": calls, "errors": []}
    # types survive exactly (1 != 1.0 != "1" != True is what matters to tools)
    for got, want in zip(parsed["tool_calls"], calls):
        for k, v in want["function"]["arguments"].items():
            assert type(got["function"]["arguments"][k]) is type(v)


def test_numeric_strings_stay_strings_when_schema_says_string(oracle):
    calls = [{"type": "function", "function": {"name": "f", "arguments": {
        "s": "42", "i": 42, "n": 42.0, "u": "7", "b": False, "o": {"nested": {"x": [1, "1"]}},
        "a": ["multi\nline", 2.5, None, True]}}},
        {"type": "function", "function": {"name": "search_web",
                                          "arguments": {"query": "1e5", "top_k": 3}}}]
    msg = {"role": "assistant", "content": "Let me look.\nTwo calls:", "reasoning_content":
           "think\nabout it", "tool_calls": calls}
    x = oracle(msg, True)
    assert x.startswith("<think>\nthink\nabout it\n</think>\n\nLet me look.\nTwo calls:\n\n"
                        "<tool_call>\n<function=f>\n<parameter=s>\n42\n</parameter>\n")
    parsed = parse_assistant(x, TOOLS)
    assert parsed["tool_calls"] == calls
    args = parsed["tool_calls"][0]["function"]["arguments"]
    assert args["s"] == "42" and args["n"] == 42.0 and isinstance(args["n"], float)
    assert parsed["tool_calls"][1]["function"]["arguments"]["query"] == "1e5"
    # without tools, the same text comes back typed only where printing gives the text back
    untyped = parse_assistant(x)["tool_calls"][1]["function"]["arguments"]
    assert untyped == {"query": "1e5", "top_k": 3}


def test_no_tool_calls_and_empty_content(oracle):
    assert parse_assistant(oracle({"role": "assistant", "content": ""}, True)) == {
        "reasoning_content": "", "content": "", "tool_calls": [], "errors": []}
    assert parse_assistant(oracle({"role": "assistant", "content": "  hi  "}, False)) == {
        "reasoning_content": None, "content": "hi", "tool_calls": [], "errors": []}


CALL = "<tool_call>\n<function=search_web>\n<parameter=query>\ncats\n</parameter>\n</function>\n</tool_call>"


@pytest.mark.parametrize("text,content,names,kinds", [
    # unterminated call: dropped and reported
    ("hi\n\n<tool_call>\n<function=search_web>\n<parameter=query>\ncats", "hi", [],
     ["malformed_tool_call"]),
    # missing </function>, then a good call: the good one survives
    ("<tool_call>\n<function=search_web>\n</tool_call>\n" + CALL, "", ["search_web"],
     ["malformed_tool_call"]),
    # no function tag at all
    ("<tool_call>\n{\"name\": \"search_web\"}\n</tool_call>", "", [], ["malformed_tool_call"]),
    # text after the calls (the template never renders it)
    (CALL + "\nand then some", "", ["search_web"], ["text_after_tool_calls"]),
    # integer parameter that is not an integer: kept raw, reported
    ("<tool_call>\n<function=search_web>\n<parameter=top_k>\nfive\n</parameter>\n</function>\n"
     "</tool_call>", "", ["search_web"], ["argument_type"]),
    # duplicated parameter
    ("<tool_call>\n<function=f>\n<parameter=s>\na\n</parameter>\n<parameter=s>\nb\n</parameter>\n"
     "</function>\n</tool_call>", "", [], ["malformed_tool_call"]),
])
def test_malformed_calls_are_structured_errors(text, content, names, kinds):
    out = parse_assistant(text, TOOLS)
    assert out["content"] == content
    assert [c["function"]["name"] for c in out["tool_calls"]] == names
    assert [e["kind"] for e in out["errors"]] == kinds
    assert all(isinstance(e["message"], str) and e["message"] for e in out["errors"])


def test_sloppy_but_unambiguous_calls_are_accepted():
    text = ("reasoning only\n</think>\nok\n<tool_call><function=search_web><parameter=query>cats"
            "</parameter><parameter=top_k>2</parameter></function></tool_call>  <|im_end|>")
    out = parse_assistant(text, TOOLS)
    assert out["reasoning_content"] == "reasoning only" and out["content"] == "ok"
    assert out["tool_calls"] == [{"type": "function", "function": {
        "name": "search_web", "arguments": {"query": "cats", "top_k": 2}}}]
    assert out["errors"] == []


def test_coerce_argument_by_schema():
    assert coerce_argument("007", {"type": "string"}) == ("007", None)
    assert coerce_argument("007", {"type": "integer"}) == (7, None)
    assert coerce_argument("3.0", {"type": "integer"}) == (3, None)
    assert coerce_argument("None", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == (None, None)
    assert coerce_argument("true", {"type": "boolean"}) == (True, None)
    v, err = coerce_argument("[1,", {"type": "array"})
    assert v == "[1," and "array" in err
    assert coerce_argument("1e5", None) == ("1e5", None)  # str(100000.0) != "1e5"
    assert coerce_argument("1.5", None) == (1.5, None)
