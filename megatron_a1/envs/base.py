"""The environment API every domain implements, a registry by domain name, and task loading.

An environment is one episode's world: the tools the model may call, their effects and the
reward. The agent loop uses it as::

    env = make("search")                      # or make("search", config=SearchConfig(...))
    messages = env.reset(task)                # initial chat messages (system?, user)
    tools = env.tools()                       # OpenAI function schemas, rendered in the prompt
    ... the model answers; for each parsed tool call:
        text = env.step(call)                 # tool response text (errors are text too)
    rewards = env.reward(final_message, messages)
    # -> {"outcome": float, "process": float | None, "components": {...}}

Tool calls are what :func:`megatron_a1.rollout.parse_assistant` returns
(``{"type": "function", "function": {"name", "arguments": dict}}``) or OpenAI message tool calls
(``arguments`` a JSON string). ``trajectory`` is the episode's OpenAI ``messages`` list (the
final assistant message included or not); rewards are computed from it and the task alone, so
they can be recomputed offline from a rollout record.

Tasks are JSON objects, one per line (JSONL): ``{"id", "prompt" | "messages", "system"?, ...}``
plus the domain's fields (gold answers, constraints, goal state; see each environment).
Add a domain by subclassing :class:`Environment` and decorating it with ``@register("name")``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

__all__ = ["Environment", "register", "make", "registry", "load_tasks", "bundled_tasks",
           "call_name_args", "tool_calls_in", "final_text", "function_tool", "TASKS_DIR"]

TASKS_DIR = os.path.join(os.path.dirname(__file__), "tasks")

_REGISTRY: dict[str, type["Environment"]] = {}


class Environment:
    """Base class: one episode at a time (``reset`` starts a new one)."""

    domain: str = "base"

    def __init__(self, config: Any = None):
        self.config = config
        self.task: dict | None = None

    def tools(self) -> list[dict]:
        """Tool schemas in OpenAI function format (``[]``: no tools)."""
        return []

    def reset(self, task: dict) -> list[dict]:
        """Start an episode on ``task``; return its initial messages."""
        self.task = task
        return initial_messages(task)

    def step(self, tool_call: dict) -> str:
        """Execute one tool call; return the tool response text (never raises for bad calls)."""
        name, _ = call_name_args(tool_call)
        return f"Error: unknown tool {name!r}; this task has no tools."

    def reward(self, final_message: dict | str, trajectory: list[dict]) -> dict:
        """``{"outcome": float, "process": float | None, "components": dict}``."""
        raise NotImplementedError


def register(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: make ``make(name)`` build this environment."""
    def deco(cls: type[Environment]) -> type[Environment]:
        _REGISTRY[name] = cls
        cls.domain = name
        return cls
    return deco


def registry() -> dict[str, type[Environment]]:
    _load_builtin()
    return dict(_REGISTRY)


def make(name: str, **kwargs) -> Environment:
    """An environment by domain name (``search``, ``science``, ``instruction``, ``tool``, or
    any registered by the user)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    from . import instruction, science, search, tool_use  # noqa: F401  (they register)


def load_tasks(path: str) -> list[dict]:
    """Tasks from a JSONL file (blank lines skipped); each must have ``prompt`` or
    ``messages``. Raises ``ValueError`` naming the line of a bad task."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(task, dict) or not ("prompt" in task or "messages" in task):
                raise ValueError(f"{path}:{lineno}: a task is an object with 'prompt' or "
                                 "'messages'")
            task.setdefault("id", f"{os.path.basename(path)}:{lineno}")
            tasks.append(task)
    return tasks


def bundled_tasks(domain: str) -> list[dict]:
    """The small task set shipped for ``domain`` (demo and tests)."""
    return load_tasks(os.path.join(TASKS_DIR, f"{domain}.jsonl"))


def initial_messages(task: dict) -> list[dict]:
    if "messages" in task:
        return [dict(m) for m in task["messages"]]
    msgs = [{"role": "system", "content": task["system"]}] if task.get("system") else []
    return msgs + [{"role": "user", "content": task["prompt"]}]


def call_name_args(tool_call: dict) -> tuple[str, Any]:
    """``(name, arguments)`` of a tool call; a JSON-string ``arguments`` is decoded (left as
    the string if it is not JSON)."""
    fn = tool_call.get("function", tool_call) if isinstance(tool_call, dict) else {}
    name = fn.get("name", "") if isinstance(fn, dict) else ""
    args = fn.get("arguments", {}) if isinstance(fn, dict) else {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return name, args


def tool_calls_in(trajectory: list[dict]) -> list[list[dict]]:
    """Tool calls per assistant turn that made any (one list per tool round)."""
    return [list(m["tool_calls"]) for m in trajectory
            if m.get("role") == "assistant" and m.get("tool_calls")]


def final_text(final_message: dict | str) -> str:
    """The answer text of the final assistant message (reasoning excluded)."""
    if isinstance(final_message, str):
        return final_message
    content = final_message.get("content") or ""
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content


def function_tool(name: str, description: str, properties: dict, required=()) -> dict:
    """An OpenAI function tool schema."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required)}}}
