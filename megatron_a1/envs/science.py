"""Science domain: a ``python`` tool run in the sandbox, and answer checking.

Task fields: ``prompt``, ``answer`` (gold), ``answer_type``: ``"numeric"`` (within
``rel_tol``/``abs_tol``, defaults 1e-4 / 1e-8; fractions and expressions such as ``3/4``,
``sqrt(2)`` are evaluated), ``"choice"`` (a letter A–J) or ``"symbolic"`` (sympy:
``simplify(pred - gold) == 0``; ``^`` means power, implicit multiplication allowed). The model's
answer is the last ``\\boxed{…}``, else the last ``<answer>…</answer>``, else the last non-empty
line. Outcome 1.0 if correct else 0.0; no process reward.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .base import Environment, call_name_args, final_text, function_tool, register, tool_calls_in
from .sandbox import Limits, run_code

__all__ = ["ScienceConfig", "ScienceEnv", "extract_final_answer", "check_answer"]


@dataclass
class ScienceConfig:
    sandbox: Limits = field(default_factory=lambda: Limits(timeout_s=10.0, memory_mb=1024))
    """Limits of each ``python`` call."""
    max_output_chars: int = 4000
    """Characters of stdout/stderr shown to the model."""
    rel_tol: float = 1e-4
    abs_tol: float = 1e-8
    check_timeout_s: float = 20.0
    """Time limit of an answer check that needs sympy (it runs in the sandbox)."""


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(text: str) -> str:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _sympify(s: str):
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    s = s.strip().strip("$").replace("\\cdot", "*").replace("\\times", "*")
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s).replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\([a-zA-Z]+)", r" \1 ", s).replace("{", "(").replace("}", ")")
    if "=" in s:  # "x = 3" -> "3"
        s = s.split("=")[-1]
    return parse_expr(s, transformations=standard_transformations
                      + (implicit_multiplication_application, convert_xor), evaluate=True)


def _number(s: str) -> float | None:
    t = s.strip().replace(",", "").rstrip(".")
    t = re.sub(r"\s*(%|[a-zA-Z]+[a-zA-Z/^0-9]*)$", "", t) if re.match(r"^[-+0-9.]", t) else t
    try:
        return float(t)
    except ValueError:
        pass
    try:
        v = complex(_sympify(s).evalf())
        return v.real if abs(v.imag) < 1e-12 else None
    except Exception:  # noqa: BLE001 — unparsable answers are wrong answers
        return None


def _plain_float(s: str) -> float | None:
    try:
        return float(str(s).strip().replace(",", "").rstrip("."))
    except ValueError:
        return None


def check_answer(pred: str, gold, answer_type: str, rel_tol: float = 1e-4,
                 abs_tol: float = 1e-8, time_limit_s: float = 20.0) -> bool:
    """Whether ``pred`` (already extracted) matches ``gold``.

    Choices and plain numbers are checked here; anything that needs sympy runs in the sandbox
    with ``time_limit_s``: a model's answer is arbitrary text, and sympy can spend hours on
    some of it (``simplify`` of a long garbage product, ``10**10**10``). A check that does not
    finish in time is a wrong answer, and the rollout goes on.
    """
    if answer_type == "choice":
        return _check(pred, gold, answer_type, rel_tol, abs_tol)
    if answer_type == "numeric":
        p, g = _plain_float(pred), _plain_float(gold)
        if p is not None and g is not None:
            return math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol)
    elif answer_type != "symbolic":
        raise ValueError(f"unknown answer_type {answer_type!r}")
    code = ("from megatron_a1.envs.science import _check\n"
            f"print(int(_check({str(pred)!r}, {str(gold)!r}, {answer_type!r}, {rel_tol!r}, "
            f"{abs_tol!r})))\n")
    result = run_code(code, Limits(timeout_s=time_limit_s, memory_mb=2048))
    return result.reason == "ok" and result.stdout.strip() == "1"


def _check(pred: str, gold, answer_type: str, rel_tol: float, abs_tol: float) -> bool:
    """The answer check itself, unbounded (:func:`check_answer` bounds it)."""
    if answer_type == "numeric":
        p, g = _number(pred), _number(str(gold))
        return p is not None and g is not None and math.isclose(p, g, rel_tol=rel_tol,
                                                                abs_tol=abs_tol)
    if answer_type == "choice":
        t = pred.strip()
        m = re.findall(r"\b([A-J])\b", t) or re.findall(r"\(([a-j])\)", t) or \
            re.findall(r"^([a-j])\b", t)
        return bool(m) and m[0].upper() == str(gold).strip().upper()
    if answer_type == "symbolic":
        import sympy

        try:
            diff = sympy.simplify(_sympify(pred) - _sympify(str(gold)))
        except Exception:  # noqa: BLE001
            return False
        return diff == 0
    raise ValueError(f"unknown answer_type {answer_type!r}")


@register("science")
class ScienceEnv(Environment):
    """A ``python`` tool (sandboxed) and checked final answers."""

    def __init__(self, config: ScienceConfig | None = None):
        super().__init__(config or ScienceConfig())

    def tools(self) -> list[dict]:
        return [function_tool("python", "Run a Python 3 program (numpy, sympy available) and "
                              "see its stdout/stderr. No network; limited time and memory.",
                              {"code": {"type": "string"}}, ["code"])]

    def step(self, tool_call: dict) -> str:
        name, args = call_name_args(tool_call)
        if name != "python":
            return f"Error: unknown tool {name!r}; available: python."
        if not isinstance(args, dict) or not isinstance(args.get("code"), str):
            return "Error: python needs a string 'code'."
        r = run_code(args["code"], self.config.sandbox)
        n = self.config.max_output_chars
        parts = []
        if r.stdout:
            parts.append(r.stdout[:n])
        if r.stderr:
            parts.append("[stderr]\n" + r.stderr[-n:])
        if r.reason not in ("ok", "error"):
            parts.append(f"[sandbox: {r.reason}]")
        return "\n".join(parts) if parts else "(no output)"

    def reward(self, final_message, trajectory: list[dict]) -> dict:
        cfg = self.config
        pred = extract_final_answer(final_text(final_message))
        kind = self.task.get("answer_type", "numeric")
        ok = check_answer(pred, self.task["answer"], kind, cfg.rel_tol, cfg.abs_tol,
                          cfg.check_timeout_s)
        calls = sum(len(t) for t in tool_calls_in(trajectory))
        return {"outcome": float(ok), "process": None,
                "components": {"correct": float(ok), "answer": pred, "answer_type": kind,
                               "python_calls": calls}}
