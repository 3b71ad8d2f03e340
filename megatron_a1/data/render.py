"""Native Qwen3.5 chat rendering with exact loss masks.

The renderer reproduces, string for string, what the official Qwen3.5 chat template
(``chat_template.jinja``) renders, while recording which characters the assistant generated. It
then tokenises the *whole* rendered string in one call and marks every token whose character
range overlaps a generated span. Because the string is identical to the template's and it is
tokenised whole, the token ids equal ``tokenizer.encode(template_output)`` by construction; BPE
merges across role boundaries cannot differ. (The tests check both claims against the template
rendered by jinja, and check the masks against prefix renderings of the template.)

Loss mask (1 = train): the assistant's whole turn after its ``<|im_start|>assistant\\n`` header —
the ``<think>…</think>`` block where the template emits one, content, tool calls and the closing
``<|im_end|>`` — and 0 on everything else: system, user, tool outputs, role headers and the
``\\n`` after every ``<|im_end|>``.

Multi-query conversations. The template keeps the reasoning of assistant turns only after the
last real user query, so a conversation is not prefix-consistent across queries. Policy
``split`` (default) makes one document per real user query: the conversation up to (excluding)
the next query, rendered as the template renders it, with the mask on that query's assistant
turns only — exactly the context the model sees at inference. Policy ``whole`` renders the whole
conversation once and masks every assistant turn (earlier turns then lack their reasoning).

Text that spells a special token. A message may contain the spelling of a special token (a tool
output quoting ``<|im_end|>``, a user pasting ``<|im_start|>assistant``). Policy: the spelling is
tokenised as that special token, because that is exactly what the inference server does with
the same template output (Hugging Face tokenizers and tiktoken with ``allowed_special="all"``
match special tokens anywhere in the text); training on anything else would teach the model a
sequence it never sees. The turn structure and the loss mask never come from re-parsing tokens:
they come from the renderer's own spans, so such text stays unmasked (or masked) exactly like the
message it belongs to. Records with such text are counted (``special_token_text``) in the
preprocessing report so they can be audited.

Unicode. Qwen's tokenizer NFC-normalises its input; for tokenizers that do (``tokenizer.nfc``)
each message text is NFC-normalised as it is placed, so character offsets stay valid.

For an agent loop in token ids (rollouts): :func:`render_prompt` gives the prompt with the
generation header, and :func:`render_tool_responses` the tokens to append after an assistant turn
the model ended with ``<|im_end|>`` — both token-exact with the template.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .records import Message, is_real_query, parse_messages, parse_tools
from .tokenizer import Tokenizer

POLICIES = ("split", "whole")

_TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
_TOOLS_FOOTER = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO "
    "suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n"
    "value_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second "
    "parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is no "
    "function call available, answer the question like normal with your current knowledge and do "
    "not tell the user about function calls\n</IMPORTANT>"
)


@dataclass
class RenderedText:
    """A rendered string and the half-open char spans ``[a, b)`` the assistant generated."""

    text: str
    spans: list[tuple[int, int]]


@dataclass
class Document:
    """One training document: token ids and the 0/1 loss mask (same length)."""

    tokens: list[int]
    loss_mask: list[int]
    query_index: int = -1  # message index of the user query this document trains (-1: whole)
    text: str = field(default="", repr=False)

    @property
    def num_masked(self) -> int:
        return int(sum(self.loss_mask))


class _Builder:
    """Accumulates rendered pieces and the char spans of generated text."""

    def __init__(self, nfc: bool):
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []
        self.nfc = nfc

    def add(self, text: str, masked: bool = False) -> None:
        """Message text (NFC-normalised for tokenizers that normalise)."""
        if self.nfc and not text.isascii():  # ASCII is NFC already
            text = unicodedata.normalize("NFC", text)
        self.lit(text, masked)

    def lit(self, text: str, masked: bool = False) -> None:
        """Template markup (ASCII, never normalised)."""
        if not text:
            return
        start = self.length
        self.parts.append(text)
        self.length += len(text)
        if masked:
            if self.spans and self.spans[-1][1] == start:
                self.spans[-1] = (self.spans[-1][0], self.length)
            else:
                self.spans.append((start, self.length))

    def result(self) -> RenderedText:
        return RenderedText("".join(self.parts), self.spans)


def format_argument(value: Any) -> str:
    """A tool-call parameter value as the template prints it: objects and lists as JSON
    (``tojson``, non-ASCII kept), everything else through jinja's ``string`` filter (``str``:
    ``True``, ``None``, ``1.5``)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def last_query_index(messages: list[Message]) -> int:
    """Index of the last real user query (the template's ``ns.last_query_index``)."""
    for i in range(len(messages) - 1, -1, -1):
        if is_real_query(messages[i]):
            return i
    raise ValueError("no user query found in messages")


def _render_system(b: _Builder, messages: list[Message], tools: list[dict] | None) -> None:
    system = messages[0].content.strip() if messages and messages[0].role == "system" else None
    if tools:
        b.lit("<|im_start|>system\n" + _TOOLS_HEADER)
        for tool in tools:
            b.lit("\n")
            b.add(json.dumps(tool, ensure_ascii=False))
        b.lit(_TOOLS_FOOTER)
        if system:
            b.lit("\n\n")
            b.add(system)
        b.lit("<|im_end|>\n")
    elif system is not None:
        b.lit("<|im_start|>system\n")
        b.add(system)
        b.lit("<|im_end|>\n")


def _render_assistant(b: _Builder, m: Message, with_think: bool, masked: bool) -> None:
    content = m.content.strip()
    reasoning = ""
    if m.reasoning is not None:
        reasoning = m.reasoning
    elif "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    reasoning = reasoning.strip()
    b.lit("<|im_start|>assistant\n")  # the role header is context, never trained
    if with_think:
        b.lit("<think>\n", masked)
        b.add(reasoning, masked)
        b.lit("\n</think>\n\n", masked)
    b.add(content, masked)
    for k, call in enumerate(m.tool_calls):
        if k == 0:
            b.lit("\n\n<tool_call>\n<function=" if content.strip() else "<tool_call>\n<function=",
                  masked)
        else:
            b.lit("\n<tool_call>\n<function=", masked)
        b.add(call.name, masked)
        b.lit(">\n", masked)
        for key, value in (call.arguments or {}).items():
            b.lit("<parameter=", masked)
            b.add(key, masked)
            b.lit(">\n", masked)
            b.add(format_argument(value), masked)
            b.lit("\n</parameter>\n", masked)
        b.lit("</function>\n</tool_call>", masked)
    b.lit("<|im_end|>", masked)
    b.lit("\n")  # the newline after <|im_end|> is template glue, not generated


def render_messages(
    messages: list[Message],
    tools: list[dict] | None = None,
    *,
    trained: Iterable[int] = (),
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    nfc: bool = False,
) -> RenderedText:
    """Render normalised messages exactly as the Qwen3.5 template; ``trained`` lists the
    indices of the assistant messages whose turns are marked as generated spans."""
    trained = set(trained)
    b = _Builder(nfc)
    _render_system(b, messages, tools)
    lq = last_query_index(messages)
    for i, m in enumerate(messages):
        if m.role == "system":
            continue  # rendered above (validation guarantees it is first)
        if m.role == "user":
            b.lit("<|im_start|>user\n")
            b.add(m.content.strip())
            b.lit("<|im_end|>\n")
        elif m.role == "assistant":
            _render_assistant(b, m, with_think=i > lq, masked=i in trained)
        elif m.role == "tool":
            if i > 0 and messages[i - 1].role != "tool":
                b.lit("<|im_start|>user")
            b.lit("\n<tool_response>\n")
            b.add(m.content.strip())
            b.lit("\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].role != "tool":
                b.lit("<|im_end|>\n")
        else:  # parse_messages rejects these; guard direct callers
            raise ValueError(f"unexpected role {m.role!r}")
    if add_generation_prompt:
        b.lit("<|im_start|>assistant\n")
        b.lit("<think>\n" if enable_thinking else "<think>\n\n</think>\n\n")
    return b.result()


def document_plan(messages: list[Message], policy: str = "split") -> list[tuple[int, int, list[int]]]:
    """``[(query_index, end, trained_indices)]``: each document renders ``messages[:end]``.

    ``split``: one per real user query that has assistant turns after it; ``whole``: one for
    the whole conversation with every assistant turn trained (query_index -1).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "whole":
        trained = [i for i, m in enumerate(messages) if m.role == "assistant"]
        return [(-1, len(messages), trained)] if trained else []
    queries = [i for i, m in enumerate(messages) if is_real_query(m)]
    plan = []
    for k, q in enumerate(queries):
        end = queries[k + 1] if k + 1 < len(queries) else len(messages)
        trained = [i for i in range(q + 1, end) if messages[i].role == "assistant"]
        if trained:
            plan.append((q, end, trained))
    return plan


def tokenize_rendered(rendered: RenderedText, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole rendered string and the 0/1 mask of tokens overlapping a span."""
    ids, mask = tokenize_rendered_arrays(rendered, tokenizer)
    return ids.tolist(), mask.astype(np.int64).tolist()


def tokenize_rendered_arrays(rendered: RenderedText,
                             tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tokenize_rendered` as arrays: ids [T] int64 and mask [T] uint8."""
    return tokenizer.encode_masked(rendered.text, rendered.spans)


def _as_messages(messages) -> list[Message]:
    if messages and isinstance(messages[0], Message):
        return list(messages)
    return parse_messages(messages)


def render(
    messages,
    tools: list[dict] | None = None,
    *,
    tokenizer: Tokenizer,
    policy: str = "split",
    keep_text: bool = False,
) -> list[Document]:
    """Training documents of one conversation (OpenAI dicts or normalised :class:`Message`\\ s).

    Raises :class:`~megatron_a1.data.records.RecordError` for invalid messages.
    """
    return [Document(ids.tolist(), mask.astype(np.int64).tolist(), query, text)
            for query, ids, mask, text in render_arrays(messages, tools, tokenizer=tokenizer,
                                                        policy=policy, keep_text=keep_text)]


def render_arrays(messages, tools: list[dict] | None = None, *, tokenizer: Tokenizer,
                  policy: str = "split", keep_text: bool = False):
    """:func:`render` as ``[(query_index, ids [T] int64, mask [T] uint8, text)]`` (text "" unless
    ``keep_text``): the preprocessing path, which never builds Python lists of ids."""
    msgs = _as_messages(messages)
    tools = parse_tools(tools)
    docs = []
    for query, end, trained in document_plan(msgs, policy):
        rendered = render_messages(msgs[:end], tools, trained=trained, nfc=tokenizer.nfc)
        ids, mask = tokenize_rendered_arrays(rendered, tokenizer)
        docs.append((query, ids, mask, rendered.text if keep_text else ""))
    return docs


def render_prompt(messages, tools: list[dict] | None = None, *, tokenizer: Tokenizer,
                  enable_thinking: bool = True) -> list[int]:
    """Token ids of the conversation so far plus the ``<|im_start|>assistant\\n<think>\\n``
    generation header (the template's ``add_generation_prompt=True``)."""
    rendered = render_messages(_as_messages(messages), parse_tools(tools),
                               add_generation_prompt=True, enable_thinking=enable_thinking,
                               nfc=tokenizer.nfc)
    return tokenizer.encode_with_offsets(rendered.text)[0]


def render_tool_responses(tool_messages, *, tokenizer: Tokenizer,
                          add_generation_prompt: bool = True,
                          enable_thinking: bool = True) -> list[int]:
    """Tokens to append after an assistant turn that ended with ``<|im_end|>`` and made tool
    calls: ``\\n<|im_start|>user`` + one ``<tool_response>`` block per result + ``<|im_end|>\\n``
    (+ the generation header), token-exact with the template's rendering of the longer
    conversation (every piece boundary here is a special token or a newline before one).

    ``tool_messages``: ``{"role": "tool", "content": ...}`` dicts (or normalised messages).
    """
    b = _Builder(tokenizer.nfc)
    b.lit("\n<|im_start|>user")
    for raw in tool_messages:
        m = raw if isinstance(raw, Message) else None
        content = m.content if m else _tool_content(raw)
        b.lit("\n<tool_response>\n")
        b.add(content.strip())
        b.lit("\n</tool_response>")
    b.lit("<|im_end|>\n")
    if add_generation_prompt:
        b.lit("<|im_start|>assistant\n")
        b.lit("<think>\n" if enable_thinking else "<think>\n\n</think>\n\n")
    return tokenizer.encode_with_offsets(b.result().text)[0]


def _tool_content(raw: dict) -> str:
    from .records import parse_message

    m = parse_message(raw, 0)
    if m.role != "tool":
        raise ValueError(f"render_tool_responses takes tool messages, got role {m.role!r}")
    return m.content


def spells_special_token(messages: list[Message], specials: Iterable[str]) -> bool:
    """Whether any message text contains the spelling of a special token (for auditing)."""
    pattern = _specials_pattern(tuple(s for s in specials if s))
    if pattern is None:
        return False
    for m in messages:
        for text in (m.content, m.reasoning or ""):
            if pattern.search(text):
                return True
        for call in m.tool_calls:
            if pattern.search(call.name) or pattern.search(json.dumps(call.arguments or {},
                                                                       ensure_ascii=False)):
                return True
    return False


@functools.lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern | None:
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
