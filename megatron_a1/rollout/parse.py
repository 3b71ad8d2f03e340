"""Parse a Qwen3.5 assistant turn back into an OpenAI message: the inverse of the chat template.

The template (``chat_template.jinja``) renders an assistant turn, after its
``<|im_start|>assistant\\n`` header, as::

    <think>\\n{reasoning|trim}\\n</think>\\n\\n      (only for turns after the last user query)
    {content|trim}
    \\n\\n                                        (only if content is not empty and calls follow)
    <tool_call>\\n<function=NAME>\\n
    <parameter=KEY>\\n{VALUE}\\n</parameter>\\n    (one per argument, in the call's key order)
    </function>\\n</tool_call>
    \\n<tool_call>…</tool_call>                  (further calls)
    <|im_end|>

and ``VALUE`` is ``tojson`` for objects and arrays (``json.dumps(v, ensure_ascii=False)``) and
jinja's ``string`` filter (Python ``str``: ``True``, ``None``, ``1.5``, ``7``) for everything else,
strings included. Rendering therefore loses the type of scalars; the tool's JSON schema gives it
back: a ``"string"`` parameter stays text even when it reads ``"42"`` or ``"True"``.

:func:`parse_assistant` returns ``{"reasoning_content", "content", "tool_calls", "errors"}``:

* ``reasoning_content``: the think block, trimmed as the template trims it; ``None`` when the text
  has no think block (turns rendered before the last user query).
* ``content``: the text before the first ``<tool_call>``, trimmed.
* ``tool_calls``: ``[{"type": "function", "function": {"name", "arguments": dict}}]`` (no ids;
  the agent loop assigns them).
* ``errors``: structured, never raised — ``{"kind", "message", "call_index", "text"}`` with
  ``kind`` one of ``malformed_tool_call`` (the call is dropped), ``text_after_tool_calls`` (the
  text is dropped; the template never renders text after calls), ``argument_type`` (the value
  does not fit the schema; it is kept as the raw string so the environment can report it). The
  agent loop turns them into an error message for the model and counts them.

Exactness. For any message ``m``, ``x = template(m)`` gives ``template(parse(x)) == x`` and, when
``m`` is canonical (trimmed content/reasoning, arguments typed as the schema says and written as
the renderer writes them), ``parse(x) == m``. Ambiguous inputs resolve deterministically: the
reasoning ends at the first ``</think>``; the calls start at the first ``<tool_call>``; a parameter
value ends at the first ``</parameter>`` that is followed by another parameter or ``</function>``
(so a string value containing ``\\n</parameter>\\n<parameter=`` cannot be recovered — no parser can
tell it from two parameters). The parser also accepts the usual sloppiness of sampled text (no
newline after ``<function=NAME>``/``<parameter=KEY>``, whitespace between calls, a missing opening
``<think>`` when the generation prompt already holds it).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["parse_assistant", "format_argument", "coerce_argument", "tool_schemas_by_name"]

_CALL_OPEN = "<tool_call>"
_CALL_CLOSE = "</tool_call>"
_FN_OPEN = "<function="
_FN_CLOSE = "</function>"
_PARAM_OPEN = "<parameter="
_PARAM_CLOSE = "</parameter>"


def format_argument(value: Any) -> str:
    """A parameter value as the template prints it (objects/arrays: ``tojson``; else ``str``)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def tool_schemas_by_name(tools: list[dict] | None) -> dict[str, dict]:
    """``{tool name: parameters JSON schema}`` from OpenAI-format tools (or bare functions)."""
    out: dict[str, dict] = {}
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def _schema_types(schema: Any) -> list[str]:
    """JSON types a (sub)schema allows, in declaration order; [] when unknown."""
    if not isinstance(schema, dict):
        return []
    types: list[str] = []
    t = schema.get("type")
    if isinstance(t, str):
        types.append(t)
    elif isinstance(t, list):
        types.extend(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or ():
            types.extend(x for x in _schema_types(sub) if x not in types)
    if not types and "enum" in schema:
        for v in schema["enum"]:
            name = _json_type(v)
            if name not in types:
                types.append(name)
    if not types and "const" in schema:
        types.append(_json_type(schema["const"]))
    if not types and "properties" in schema:
        types.append("object")
    if not types and "items" in schema:
        types.append("array")
    return types


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    return "object"


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)")
_MISSING = object()


def _as_type(raw: str, t: str) -> Any:
    """``raw`` read as JSON type ``t``, or ``_MISSING``."""
    s = raw.strip()
    if t == "string":
        return raw
    if t == "null":
        return None if s in ("None", "null") else _MISSING
    if t == "boolean":
        return {"True": True, "true": True, "False": False, "false": False}.get(s, _MISSING)
    if t == "integer":
        if _INT.fullmatch(s):
            return int(s)
        if _FLOAT.fullmatch(s):  # "3.0" for an integer parameter
            f = float(s)
            return int(f) if math.isfinite(f) and f.is_integer() else _MISSING
        return _MISSING
    if t == "number":
        if _INT.fullmatch(s):
            return int(s)
        return float(s) if _FLOAT.fullmatch(s) else _MISSING
    if t in ("object", "array"):
        try:
            v = json.loads(s)
        except (json.JSONDecodeError, RecursionError):
            return _MISSING
        return v if isinstance(v, dict if t == "object" else list) else _MISSING
    return _MISSING


_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array", "string")


def coerce_argument(raw: str, schema: Any) -> tuple[Any, str | None]:
    """``(value, error)``: the raw parameter text typed by its JSON schema.

    With a schema, the first allowed type the text reads as wins (``null``, ``boolean``,
    ``integer``, ``number``, ``object``, ``array``, then ``string``); if none fits, the raw string
    and an error message. Without one (unknown tool or parameter), a value is typed only when
    printing it back gives exactly ``raw`` (``7``, ``1.5``, ``True``, ``None``, canonical JSON) —
    so ``template(parse(x)) == x`` always — and stays a string otherwise.
    """
    types = _schema_types(schema)
    if types:
        for t in _TYPE_ORDER:
            if t in types:
                v = _as_type(raw, t)
                if v is not _MISSING:
                    return v, None
        return raw, f"value {raw[:80]!r} is not of type {' | '.join(types)}"
    for t in _TYPE_ORDER[:-1]:
        v = _as_type(raw, t)
        if v is not _MISSING and format_argument(v) == raw:
            return v, None
    return raw, None


class _Malformed(Exception):
    pass


def _skip_newline(text: str, pos: int) -> int:
    return pos + 1 if text.startswith("\n", pos) else pos


def _expect(text: str, pos: int, token: str) -> int:
    if not text.startswith(token, pos):
        got = text[pos:pos + 30]
        raise _Malformed(f"expected {token!r} at offset {pos}, found {got!r}")
    return pos + len(token)


def _read_name(text: str, pos: int, what: str) -> tuple[str, int]:
    end = text.find(">", pos)
    nl = text.find("\n", pos)
    if end < 0 or (0 <= nl < end):
        raise _Malformed(f"unterminated {what} name at offset {pos}")
    name = text[pos:end].strip()
    if not name:
        raise _Malformed(f"empty {what} name at offset {pos}")
    return name, end + 1


def _read_value(text: str, pos: int) -> tuple[str, int]:
    """Value starting at ``pos`` (after ``<parameter=KEY>``); returns (raw, pos after close)."""
    start = _skip_newline(text, pos)
    search = start
    while True:
        end = text.find(_PARAM_CLOSE, search)
        if end < 0:
            raise _Malformed(f"parameter value at offset {pos} has no {_PARAM_CLOSE!r}")
        after = _skip_newline(text, end + len(_PARAM_CLOSE))
        nxt = _skip_ws(text, after)
        if text.startswith(_PARAM_OPEN, nxt) or text.startswith(_FN_CLOSE, nxt):
            raw = text[start:end]
            if raw.endswith("\n") and end > start:
                raw = raw[:-1]
            return raw, after
        search = end + 1


def _parse_call(text: str, pos: int, schemas: dict[str, dict], index: int,
                errors: list[dict]) -> tuple[dict, int]:
    pos = _expect(text, pos, _CALL_OPEN)
    pos = _skip_ws(text, pos)
    pos = _expect(text, pos, _FN_OPEN)
    name, pos = _read_name(text, pos, "function")
    pos = _skip_newline(text, pos)
    params = schemas.get(name, {}).get("properties") if name in schemas else None
    arguments: dict[str, Any] = {}
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith(_FN_CLOSE, pos):
            pos += len(_FN_CLOSE)
            break
        pos = _expect(text, pos, _PARAM_OPEN)
        key, pos = _read_name(text, pos, "parameter")
        raw, pos = _read_value(text, pos)
        schema = params.get(key) if isinstance(params, dict) else None
        value, err = coerce_argument(raw, schema)
        if err:
            errors.append({"kind": "argument_type", "call_index": index,
                           "message": f"{name}.{key}: {err}", "text": raw})
        if key in arguments:
            raise _Malformed(f"parameter {key!r} given twice")
        arguments[key] = value
    pos = _skip_ws(text, pos)
    pos = _expect(text, pos, _CALL_CLOSE)
    return {"type": "function", "function": {"name": name, "arguments": arguments}}, pos


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def parse_assistant(text: str, tools: list[dict] | None = None) -> dict[str, Any]:
    """Parse one generated assistant turn (without the ``<|im_end|>``) — see the module doc.

    ``tools``: the turn's tool definitions (OpenAI function format); their parameter schemas
    type the argument values. Never raises on malformed model output.
    """
    if text.endswith("<|im_end|>"):
        text = text[: -len("<|im_end|>")]
    schemas = tool_schemas_by_name(tools)
    reasoning = None
    rest = text
    if "</think>" in text:
        # the template's own split: reasoning before the first </think>, after the last <think>
        head, _, rest = text.partition("</think>")
        reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n").strip()
        rest = rest.lstrip("\n")
    errors: list[dict] = []
    calls: list[dict] = []
    first = rest.find(_CALL_OPEN)
    if first < 0:
        return {"reasoning_content": reasoning, "content": rest.strip(), "tool_calls": [],
                "errors": errors}
    content = rest[:first].strip()
    pos = first
    while pos < len(rest):
        if not rest.startswith(_CALL_OPEN, pos):
            tail = rest[pos:]
            nxt = tail.find(_CALL_OPEN)
            junk = tail if nxt < 0 else tail[:nxt]
            errors.append({"kind": "text_after_tool_calls", "call_index": None,
                           "message": "text between or after tool calls is ignored",
                           "text": junk})
            if nxt < 0:
                break
            pos += nxt
            continue
        try:
            call, end = _parse_call(rest, pos, schemas, len(calls), errors)
        except _Malformed as exc:
            nxt = rest.find(_CALL_OPEN, pos + len(_CALL_OPEN))
            end_close = rest.find(_CALL_CLOSE, pos)
            stop = len(rest) if nxt < 0 else nxt
            if 0 <= end_close < stop:
                stop = end_close + len(_CALL_CLOSE)
            errors.append({"kind": "malformed_tool_call", "call_index": len(calls),
                           "message": str(exc), "text": rest[pos:stop]})
            pos = _skip_ws(rest, stop)
            continue
        calls.append(call)
        pos = _skip_ws(rest, end)
    return {"reasoning_content": reasoning, "content": content, "tool_calls": calls,
            "errors": errors}
