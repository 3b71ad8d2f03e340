"""Tool use: JSON-schema functions over a small in-memory database the tools read and mutate.

A task declares its whole world as data, so users write new domains without code:

* ``db``: ``{table: {key: record}}`` — the initial state;
* ``functions``: ``[{"name", "description", "parameters": JSON schema, "op", "table",
  "key": param naming the record, "require": {field: value}?, "set": {field: value}?}]`` with
  ``op`` one of ``get`` (return the record), ``find`` (records whose fields equal every given
  argument), ``insert`` (new record from the arguments; the key must be new), ``update``
  (write the non-key arguments and ``set`` into the record), ``delete``; ``require`` makes the
  call fail unless the record currently has those field values (e.g. only ``pending`` orders can
  be cancelled);
* ``goal``: ``{"state": {table: {key: record}}?, "answer_contains": [str]?}``.

A call is *valid* when the function exists, its arguments validate against its schema
(``jsonschema``) and the state allows it (record exists/is new, ``require`` holds). Invalid calls
change nothing and return an ``Error: …`` text.

Rewards are recomputed by replaying the trajectory's calls on a fresh copy of ``db``:
``outcome`` = 1.0 iff every goal table equals the final state exactly and the final answer
contains every ``answer_contains`` string (case-insensitive); ``process`` = valid calls / calls
(0.0 when no call was made) — the input of the tool teacher's asymmetric advantage.
Subclass :class:`ToolUseEnv` and override :meth:`ToolUseEnv.execute` for tools that are code.
"""
from __future__ import annotations

import copy
import json

import jsonschema

from .base import Environment, call_name_args, final_text, register, tool_calls_in

__all__ = ["ToolUseEnv", "CallError"]

OPS = ("get", "find", "insert", "update", "delete")


class CallError(Exception):
    """A call the schema or the state does not allow; its text is the tool response."""


@register("tool")
class ToolUseEnv(Environment):
    def reset(self, task: dict) -> list[dict]:
        msgs = super().reset(task)
        self.functions = {f["name"]: f for f in task["functions"]}
        self.db = copy.deepcopy(task.get("db", {}))
        self.calls: list[bool] = []
        return msgs

    def tools(self) -> list[dict]:
        return [{"type": "function", "function": {
            "name": f["name"], "description": f.get("description", ""),
            "parameters": f.get("parameters", {"type": "object", "properties": {}})}}
            for f in self.task["functions"]]

    def step(self, tool_call: dict) -> str:
        text, valid = self._call(self.db, tool_call)
        self.calls.append(valid)
        return text

    def _call(self, db: dict, tool_call: dict) -> tuple[str, bool]:
        name, args = call_name_args(tool_call)
        try:
            fn = self.functions.get(name)
            if fn is None:
                raise CallError(f"unknown function {name!r}; available: "
                                f"{', '.join(self.functions)}")
            if not isinstance(args, dict):
                raise CallError("arguments must be a JSON object")
            schema = fn.get("parameters", {"type": "object"})
            err = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(args)), None)
            if err is not None:
                path = ".".join(str(p) for p in err.absolute_path) or "arguments"
                raise CallError(f"invalid arguments for {name}: {path}: {err.message}")
            result = self.execute(db, fn, args)
        except CallError as exc:
            return f"Error: {exc}", False
        return json.dumps(result, ensure_ascii=False, sort_keys=True), True

    def execute(self, db: dict, fn: dict, args: dict):
        """Apply one schema-valid call to ``db``; raise :class:`CallError` when the state does
        not allow it; return a JSON-serialisable result."""
        op, table = fn["op"], db.setdefault(fn["table"], {})
        if op not in OPS:
            raise ValueError(f"function {fn['name']}: unknown op {op!r}")
        if op == "find":
            return [r for _, r in sorted(table.items())
                    if all(r.get(k) == v for k, v in args.items())]
        key = str(args.get(fn["key"]))
        fields = {k: v for k, v in args.items() if k != fn["key"]}
        if op == "insert":
            if key in table:
                raise CallError(f"{fn['table']} {key!r} already exists")
            table[key] = {fn["key"]: args[fn["key"]], **fields, **fn.get("set", {})}
            return table[key]
        if key not in table:
            raise CallError(f"no {fn['table']} with {fn['key']}={key!r}")
        record = table[key]
        for k, v in fn.get("require", {}).items():
            if record.get(k) != v:
                raise CallError(f"{fn['name']} needs {k}={v!r}, but {fn['table']} {key!r} has "
                                f"{k}={record.get(k)!r}")
        if op == "get":
            return record
        if op == "update":
            record.update(fields)
            record.update(fn.get("set", {}))
            return record
        del table[key]
        return {"deleted": key}

    def reward(self, final_message, trajectory: list[dict]) -> dict:
        db = copy.deepcopy(self.task.get("db", {}))
        valid = [self._call(db, c)[1] for turn in tool_calls_in(trajectory) for c in turn]
        goal = self.task.get("goal", {})
        state_ok = all(db.get(t, {}) == want for t, want in goal.get("state", {}).items())
        text = final_text(final_message).lower()
        answer_ok = all(s.lower() in text for s in goal.get("answer_contains", []))
        process = sum(valid) / len(valid) if valid else 0.0
        return {"outcome": float(state_ok and answer_ok), "process": process,
                "components": {"state_match": float(state_ok), "answer_match": float(answer_ok),
                               "valid_calls": sum(valid), "calls": len(valid)}}
