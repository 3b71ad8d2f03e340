"""Trajectory records: parse one JSONL line, validate it, and normalise it for the renderer.

A record is ``{"messages": [...], "tools": [...], "domain": str, "id": ...}`` (DESIGN.md §5).
Validation rejects exactly what would make the Qwen3.5 chat template fail or render something
that cannot be trained on, with one human-readable reason per record:

* invalid JSON, a line that is not a JSON object, ``messages`` missing/empty/not a list;
* a message that is not an object, an unknown role, a system message not at the start,
  content of an unsupported type (images/videos are not part of this pipeline);
* no real user query (the template raises: every user turn is a wrapped tool response);
* a tool call without a function name, or whose ``arguments`` are neither an object nor a
  JSON string that decodes to an object;
* a ``tool`` message that does not follow an assistant message with tool calls;
* no assistant turn at all (nothing to train on).

Normalised messages keep the *raw* content string (the renderer trims it as the template does)
and parsed tool-call arguments (the template iterates ``arguments|items``, so string arguments
are decoded here, as inference servers do before rendering).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# transformers aliases these names to ``reasoning_content`` before rendering; so do we.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class RecordError(ValueError):
    """A record that cannot be rendered; ``str(err)`` is the reason written to the report."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | None  # None: no ``arguments`` key (renders no parameters)


@dataclass(frozen=True)
class Message:
    role: str
    content: str  # raw text (parts joined); "" for null content
    reasoning: str | None = None  # explicit reasoning (any alias); None: absent
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class Trajectory:
    messages: list[Message]
    tools: list[dict] | None
    domain: str
    id: str | None
    meta: dict = field(default_factory=dict)


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise RecordError(f"{where}: content part is not an object")
            if "image" in part or "image_url" in part or part.get("type") in ("image", "video") \
                    or "video" in part:
                raise RecordError(f"{where}: image/video content is not supported")
            if "text" not in part:
                raise RecordError(f"{where}: content part without text")
            parts.append(str(part["text"]))
        return "".join(parts)
    raise RecordError(f"{where}: content must be a string, a list of text parts or null")


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: tool call is not an object")
    fn = raw["function"] if "function" in raw else raw
    if not isinstance(fn, dict):
        raise RecordError(f"{where}: tool call function is not an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError(f"{where}: tool call without a function name")
    if "arguments" not in fn:
        return ToolCall(name, None)
    args = fn["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: tool call {name!r} arguments are not valid JSON ({exc.msg})")
    if not isinstance(args, dict):
        raise RecordError(f"{where}: tool call {name!r} arguments must be a JSON object")
    return ToolCall(name, args)


def parse_message(raw: Any, index: int) -> Message:
    """One OpenAI chat message -> :class:`Message` (raises :class:`RecordError`)."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: message is not an object")
    role = raw.get("role")
    if role not in ROLES:
        raise RecordError(f"{where}: unknown role {role!r}")
    content = _content_text(raw.get("content"), where)
    reasoning = None
    for key in REASONING_FIELDS:
        if raw.get(key) is not None:
            reasoning = raw[key]
            break
    if reasoning is not None and not isinstance(reasoning, str):
        raise RecordError(f"{where}: reasoning_content must be a string")
    calls = raw.get("tool_calls") or ()
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise RecordError(f"{where}: tool_calls must be a list")
        calls = tuple(_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
    else:
        calls = ()
    return Message(role, content, reasoning if role == "assistant" else None, calls)


def is_real_query(message: Message) -> bool:
    """A user turn that is not a wrapped tool response (the template's 'last query' test)."""
    if message.role != "user":
        return False
    text = message.content.strip()
    return not (text.startswith("<tool_response>") and text.endswith("</tool_response>"))


def parse_messages(raw_messages: Any) -> list[Message]:
    """Validate and normalise a ``messages`` list (raises :class:`RecordError`)."""
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RecordError("messages missing, empty or not a list")
    messages = [parse_message(m, i) for i, m in enumerate(raw_messages)]
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RecordError(f"messages[{i}]: system message not at the beginning")
        if m.role == "tool":
            j = i - 1
            while j >= 0 and messages[j].role == "tool":
                j -= 1
            if j < 0 or messages[j].role != "assistant" or not messages[j].tool_calls:
                raise RecordError(f"messages[{i}]: tool message without a preceding tool call")
    if not any(is_real_query(m) for m in messages):
        raise RecordError("no user query (every user turn is a tool response)")
    return messages


def parse_tools(raw_tools: Any) -> list[dict] | None:
    """``tools`` must be absent/null or a list of objects (JSON schemas)."""
    if raw_tools is None:
        return None
    if not isinstance(raw_tools, list) or not all(isinstance(t, dict) for t in raw_tools):
        raise RecordError("tools must be a list of objects")
    return raw_tools or None


def parse_record(obj: Any) -> Trajectory:
    """A decoded JSON value -> :class:`Trajectory` (raises :class:`RecordError`)."""
    if not isinstance(obj, dict):
        raise RecordError(f"record is not a JSON object (got {type(obj).__name__})")
    messages = parse_messages(obj.get("messages"))
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("no assistant turn (nothing to train on)")
    domain = obj.get("domain")
    rid = obj.get("id")
    return Trajectory(
        messages=messages,
        tools=parse_tools(obj.get("tools")),
        domain=str(domain) if domain is not None else "unknown",
        id=str(rid) if rid is not None else None,
    )


def parse_line(line: str) -> Trajectory:
    """One JSONL line -> :class:`Trajectory` (raises :class:`RecordError`)."""
    try:
        obj = json.loads(line.strip())
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    return parse_record(obj)
