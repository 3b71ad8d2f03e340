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
* ``content``: the text before the calls, trimmed.
* ``tool_calls``: ``[{"type": "function", "function": {"name", "arguments": dict}}]`` (no ids;
  the agent loop assigns them).
* ``errors``: structured, never raised — ``{"kind", "message", "call_index", "text"}`` with
  ``kind`` one of ``malformed_tool_call`` (the call is dropped; for ambiguous text, every call),
  ``text_after_tool_calls`` (the text is dropped; the template never renders text after calls),
  ``argument_type`` (the value does not fit the schema; it is kept as the raw string so the
  environment can report it). The agent loop turns them into an error message for the model and
  counts them.

Reading the calls. Parameter values are free text, so they may hold tool-call markup
(``</parameter>``, ``</function>``, ``<tool_call>``, …) and the same text can be the template's
rendering of several call lists. The parser therefore considers every *reading*: a way to split
the text from a ``<tool_call>`` to the end of the turn exactly as the template's grammar::

    CALLS := CALL ("\n" CALL)*          CALL := "<tool_call>\n<function=" NAME ">\n" PARAM*
    PARAM := "<parameter=" KEY ">\n" VALUE "\n</parameter>\n"        "</function>\n</tool_call>"

(values are found by trying every ``\n</parameter>\n`` as their end, not the first one, so a
value holding ``\n</parameter>\n</function>\n</tool_call>\n`` is not cut short), and decides:

1. The calls start at the one ``<tool_call>`` that opens the turn or follows ``"\n\n"`` after
   trimmed, non-empty content, and from which a reading runs to the end. Several such starts:
   ambiguous. None: the text is not the template's (sampled sloppiness), see below.
2. A value may not hold a line opening ``<parameter=…>`` with no ``</parameter>`` line after it:
   that is what a missing closing tag looks like once the next tag closes the value, and it is
   reported as one (``malformed_tool_call``) — the one value class that does not round-trip
   (when the text also reads as other calls, it is their rendering, and rule 3 applies).
3. Among the readings whose function and parameter names are in the tool schemas, whose values
   fit their types and which give every required parameter, a unique one is executed. Else, a
   unique reading regardless of the schemas is executed (the environment reports unknown names).
4. Anything else is ambiguous: one ``malformed_tool_call`` error, and no call at all is
   executed — never a call list the model may not have written. (Example: two calls, the second
   of which holds a ``\n</parameter>\n`` line, also read as one call whose last value swallows
   the second; when that call fits the schema too, both readings are possible.)

Exactness. For any message ``m`` and ``x = template(m)``, when it reports no error,
``template(parse(x)) == x``. When ``m``'s calls fit the schemas (known names and parameters,
typed values, required parameters given) and no value falls under rule 2, ``parse(x)`` returns
``m``'s calls or (rule 4) an error and none of them: it never returns a call ``m`` did not
make. When ``m`` is canonical (trimmed content/reasoning, arguments typed as the schema says)
and its values hold no markup, ``parse(x) == m``. Content holding ``<tool_call>`` and
reasoning holding ``</think>`` are ambiguous in the template itself: the reasoning ends at the
first ``</think>``.

Sloppy text (no reading from any ``<tool_call>``) is parsed call by call from the first
``<tool_call>``: a value ends at the first ``</parameter>`` followed by another parameter or
``</function>``; no newline needed after ``<function=NAME>``/``<parameter=KEY>``, whitespace
allowed between calls, a missing opening ``<think>`` accepted when the generation prompt already
holds it; a missing ``</parameter>`` or ``</function>`` drops the call with an error.

Where this differs from the Qwen3-Coder parsers of vLLM and SGLang: they cut a value at the first
``</parameter>`` and run a bare ``<function=…>`` block without ``<tool_call>`` as a call; here a
value is never cut at markup it holds, and a bare block is content (the template always wraps
calls; quoted markup in prose must not run).
"""
from __future__ import annotations

import bisect
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


# type names tool authors write that JSON Schema spells differently (the Qwen3-Coder parsers of
# vLLM and SGLang accept them too)
_TYPE_ALIASES = {"int": "integer", "float": "number", "double": "number", "bool": "boolean",
                 "str": "string", "dict": "object", "list": "array"}


def _schema_types(schema: Any) -> list[str]:
    """JSON types a (sub)schema allows, in declaration order; [] when unknown."""
    if not isinstance(schema, dict):
        return []
    types: list[str] = []
    t = schema.get("type")
    for x in ([t] if isinstance(t, str) else t if isinstance(t, list) else ()):
        if isinstance(x, str):
            types.append(_TYPE_ALIASES.get(x, x))
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


# ---- the template's exact grammar -----------------------------------------------------------
# CALLS  := CALL ("\n" CALL)* END
# CALL   := "<tool_call>\n<function=" NAME ">\n" PARAM* "</function>\n</tool_call>"
# PARAM  := "<parameter=" KEY ">\n" VALUE "\n</parameter>\n"
# NAME and KEY hold no ">" and no newline; VALUE is any text.

_CALL_HEAD = _CALL_OPEN + "\n" + _FN_OPEN
_CALL_TAIL = _FN_CLOSE + "\n" + _CALL_CLOSE
_VALUE_TAIL = "\n" + _PARAM_CLOSE + "\n"
_MAX_PARSES = 64  # more readings than this: reported as ambiguous without looking further
_OPEN_LINE = re.compile(re.escape(_PARAM_OPEN) + r"[^\n>]*>")


def _tag_name(text: str, pos: int) -> tuple[str, int] | None:
    """``NAME`` of ``NAME>\n`` at ``pos`` and the position after the newline, or None."""
    end = text.find(">", pos)
    if end <= pos or "\n" in text[pos:end] or not text.startswith(">\n", end):
        return None
    return text[pos:end], end + 2


class _Grammar:
    """Every reading of ``text`` from a ``<tool_call>`` to its end as the template's calls.

    With ``schemas``, only readings whose function names and parameter names are in them.
    ``can_*`` are memoised feasibility checks, so the lazy enumeration only walks prefixes that
    complete: its cost is the number of complete readings times their length.
    """

    def __init__(self, text: str, schemas: dict[str, dict] | None = None,
                 admissible: bool = True):
        self.text = text
        self.schemas = schemas
        self.admissible = admissible
        # overlapping: in "\n</parameter>\n</parameter>\n" both closings are candidates
        self.closes = [m.start() for m in re.finditer(f"(?={re.escape(_VALUE_TAIL)})", text)]
        opens = [m for m in _OPEN_LINE.finditer(text)
                 if m.start() == 0 or text[m.start() - 1] == "\n"]
        self.open_starts = [m.start() for m in opens]
        self.open_ends = [m.end() for m in opens]
        self._calls: dict[int, bool] = {}
        self._params: dict[tuple[int, str], bool] = {}

    def _unclosed(self, start: int, end: int) -> bool:
        """:func:`_unclosed_parameter` of ``text[start:end]`` (a value: ``start`` begins a
        line, ``end`` is followed by the value's closing line), by bisection."""
        k = bisect.bisect_right(self.open_ends, end) - 1
        if k < 0 or self.open_starts[k] < start:
            return False
        j = bisect.bisect_left(self.closes, self.open_ends[k])
        return not (j < len(self.closes) and self.closes[j] + len(_VALUE_TAIL) - 1 <= end)

    def _name_ok(self, name: str) -> bool:
        return self.schemas is None or name in self.schemas

    def _key_ok(self, name: str, key: str) -> bool:
        if self.schemas is None:
            return True
        props = self.schemas[name].get("properties")
        return not isinstance(props, dict) or key in props

    def _head(self, pos: int) -> tuple[str, int] | None:
        """Function name and body position of the call at ``pos``, if it may be read."""
        if not self.text.startswith(_CALL_HEAD, pos):
            return None
        got = _tag_name(self.text, pos + len(_CALL_HEAD))
        return got if got is not None and self._name_ok(got[0]) else None

    def _param(self, pos: int, name: str) -> tuple[str, int] | None:
        """Key and value position of the parameter at ``pos``, if it may be read."""
        if not self.text.startswith(_PARAM_OPEN, pos):
            return None
        got = _tag_name(self.text, pos + len(_PARAM_OPEN))
        return got if got is not None and self._key_ok(name, got[0]) else None

    def _ends_call(self, pos: int) -> bool:
        """``</function>\n</tool_call>`` at ``pos``, then the end or the next call."""
        end = pos + len(_CALL_TAIL)
        return self.text.startswith(_CALL_TAIL, pos) and (
            end == len(self.text) or (self.text.startswith("\n", end)
                                      and self.can_calls(end + 1)))

    def can_calls(self, pos: int) -> bool:
        if pos not in self._calls:
            head = self._head(pos)
            self._calls[pos] = head is not None and self.can_params(head[1], head[0])
        return self._calls[pos]

    def can_params(self, pos: int, name: str) -> bool:
        if (pos, name) not in self._params:
            ok = self._ends_call(pos)
            if not ok:
                got = self._param(pos, name)
                ok = got is not None and any(self.can_params(c + len(_VALUE_TAIL), name)
                                             for c in self._value_ends(got[1]))
            self._params[(pos, name)] = ok
        return self._params[(pos, name)]

    def _value_ends(self, start: int):
        for c in self.closes[bisect.bisect_left(self.closes, start):]:
            if not (self.admissible and self._unclosed(start, c)):
                yield c

    def calls(self, pos: int):
        """Readings from ``pos``: lists of ``(name, [(key, raw)])``."""
        name, body = self._head(pos)
        for params, end in self.params(body, name):
            if end == len(self.text):
                yield [(name, params)]
            else:
                for more in self.calls(end + 1):
                    yield [(name, params)] + more

    def params(self, pos: int, name: str):
        """``(params, position after </tool_call>)`` for every reading of a call's body."""
        if self._ends_call(pos):
            yield [], pos + len(_CALL_TAIL)
        got = self._param(pos, name)
        if got is None:
            return
        key, start = got
        for c in self._value_ends(start):
            nxt = c + len(_VALUE_TAIL)
            if self.can_params(nxt, name):
                for rest, end in self.params(nxt, name):
                    yield [(key, self.text[start:c])] + rest, end


def _unclosed_parameter(raw: str, lines: bool = True) -> bool:
    """A value holding an opening ``<parameter=…>`` without a closing ``</parameter>`` after it:
    what a model's missing closing tag looks like once the next tag closes the value.

    ``lines``: the template's layout (the opening starts a line, the closing is a line of its
    own); else any occurrence counts (sloppy text).
    """
    last = -1
    for m in _OPEN_LINE.finditer(raw):
        if not lines or m.start() == 0 or raw[m.start() - 1] == "\n":
            last = m.end()
    if last < 0:
        return False
    if not lines:
        return raw.find(_PARAM_CLOSE, last) < 0
    close = re.compile(r"\n" + re.escape(_PARAM_CLOSE) + r"(\n|$)")
    return close.search(raw, last) is None


def _build_call(name: str, params: list[tuple[str, str]], schemas: dict[str, dict]
                ) -> tuple[dict, list[str], list[str], bool]:
    """``(call, type errors, structural problems, fits the schemas)`` of one reading of one
    call. Structural problems (a repeated parameter, a missing closing tag) drop the call;
    unknown names and missing required parameters only weigh against the reading (the
    environment reports them)."""
    schema = schemas.get(name)
    props = schema.get("properties") if isinstance(schema, dict) else None
    arguments: dict[str, Any] = {}
    type_errors, problems = [], []
    fits = not schemas or name in schemas
    for key, raw in params:
        if key in arguments:
            problems.append(f"parameter {key!r} given twice")
        if isinstance(props, dict) and key not in props:
            fits = False
        if _unclosed_parameter(raw):
            problems.append(f"parameter {key!r} holds an opening <parameter=…> line without "
                            f"its {_PARAM_CLOSE} (missing closing tag?)")
        sub = props.get(key) if isinstance(props, dict) else None
        value, err = coerce_argument(raw, sub)
        if err:
            type_errors.append(f"{name}.{key}: {err}")
        elif isinstance(sub, dict) and isinstance(sub.get("enum"), list) and \
                value not in sub["enum"]:
            fits = False  # not an error here: the environment judges its own values
        arguments[key] = value
    required = schema.get("required") if isinstance(schema, dict) else None
    if isinstance(required, list) and not set(required) <= set(arguments):
        fits = False
    return ({"type": "function", "function": {"name": name, "arguments": arguments}},
            type_errors, problems, fits and not type_errors and not problems)


def _calls_start(rest: str) -> int | None:
    """Where the calls start under the template's exact grammar: the one ``<tool_call>`` that
    opens the turn or follows ``"\n\n"`` after trimmed, non-empty content and has a reading
    to the end of the turn. None: no such start; -1: more than one (ambiguous)."""
    grammar = _Grammar(rest, admissible=False)  # a value missing its closing tag is reported
    found = []
    pos = rest.find(_CALL_OPEN)
    while pos >= 0:
        content = rest[:pos - 2] if pos >= 2 else ""
        framed = pos == 0 or (rest.startswith("\n\n", pos - 2) and content
                              and content == content.strip())
        if framed and grammar.can_calls(pos):
            found.append(pos)
        pos = rest.find(_CALL_OPEN, pos + 1)
    return None if not found else found[0] if len(found) == 1 else -1


def _readings(text: str, schemas: dict[str, dict] | None, admissible: bool = True
              ) -> list[list[tuple]]:
    """Up to ``_MAX_PARSES + 1`` readings of ``text`` (see :class:`_Grammar`)."""
    grammar = _Grammar(text, schemas, admissible)
    if not grammar.can_calls(0):
        return []
    out = []
    for r in grammar.calls(0):
        out.append(r)
        if len(out) > _MAX_PARSES:
            break
    return out


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
    """One call of sloppy text (see :func:`_lenient`)."""
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
        if _unclosed_parameter(raw, lines=False):
            raise _Malformed(f"parameter {key!r} holds an opening <parameter=…> line without "
                             f"its {_PARAM_CLOSE} (missing closing tag?)")
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


def _lenient(rest: str, first: int, schemas: dict[str, dict], calls: list[dict],
             errors: list[dict]) -> None:
    """Calls of text the template did not render (a sampled turn's sloppiness): call by call
    from ``first``, a value ending at the first ``</parameter>`` followed by another parameter
    or ``</function>``; a call that does not parse is dropped and reported."""
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


def _ambiguous(text: str, count: int, why: str) -> dict:
    n = f"more than {_MAX_PARSES}" if count > _MAX_PARSES else str(count)
    return {"kind": "malformed_tool_call", "call_index": 0, "text": text,
            "message": f"ambiguous tool calls: the text reads as the template's rendering of "
                       f"{n} different call lists and {why}; nothing was executed (does a "
                       f"parameter value hold tool-call markup?)"}


def _resolve(text: str, schemas: dict[str, dict], calls: list[dict],
             errors: list[dict]) -> None:
    """Pick the reading of ``text`` (the calls, to the end of the turn) to execute, or report
    it as ambiguous (the rules are in the module doc)."""
    chosen = None
    if schemas:  # readings that fit the schemas first (the cheapest to enumerate)
        named = _readings(text, schemas)
        fitting = [b for b in ([_build_call(n, p, schemas) for n, p in r] for r in named)
                   if all(fits for *_, fits in b)]
        if len(fitting) > 1 or len(named) > _MAX_PARSES:
            errors.append(_ambiguous(text, len(named), "more than one fits the tool schemas"))
            return
        chosen = fitting[0] if fitting else None
    if chosen is None:  # any names, then values without their closing tag (to report them)
        for admissible in (True, False):
            built = [[_build_call(n, p, schemas) for n, p in r]
                     for r in _readings(text, None, admissible)]
            if len(built) == 1:
                chosen = built[0]
                break
            if built:
                errors.append(_ambiguous(text, len(built), (
                    "none or several fit the tool schemas" if admissible else
                    "each has a parameter without its closing tag")))
                return
    for call, type_errors, problems, _ in chosen:
        index = len(calls)
        if problems:
            errors.append({"kind": "malformed_tool_call", "call_index": index,
                           "message": f"{call['function']['name']}: " + "; ".join(problems),
                           "text": text})
            continue
        for msg in type_errors:
            errors.append({"kind": "argument_type", "call_index": index, "message": msg,
                           "text": text})
        calls.append(call)


def parse_assistant(text: str, tools: list[dict] | None = None) -> dict[str, Any]:
    """Parse one generated assistant turn (without the ``<|im_end|>``) — see the module doc.

    ``tools``: the turn's tool definitions (OpenAI function format); their parameter schemas
    type the argument values and decide between readings. Never raises on model output.
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
    try:
        start = _calls_start(rest)
    except RecursionError:  # hundreds of parameters: read it as sloppy text
        start = None
    if start is None:
        content = rest[:first].strip()
        _lenient(rest, first, schemas, calls, errors)
    elif start < 0:
        content = rest[:first].strip()
        errors.append({"kind": "malformed_tool_call", "call_index": 0, "text": rest[first:],
                       "message": "ambiguous tool calls: they can start at more than one "
                                  "<tool_call>; nothing was executed"})
    else:
        content = rest[:start].strip()
        try:
            _resolve(rest[start:], schemas, calls, errors)
        except RecursionError:
            calls.clear()
            errors[:] = [_ambiguous(rest[start:], _MAX_PARSES + 1, "too deep to enumerate")]
    return {"reasoning_content": reasoning, "content": content, "tool_calls": calls,
            "errors": errors}
