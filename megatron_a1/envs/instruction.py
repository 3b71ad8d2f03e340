"""Instruction following: IFEval-style verifiable constraints on the final answer.

Task fields: ``prompt`` and ``constraints``: ``[{"type": NAME, ...parameters}]``. The response
is the final assistant content (reasoning excluded). Outcome 1.0 if every constraint holds, else
0.0; ``components["fraction"]`` is the fraction satisfied and ``components[f"{i}:{type}"]`` each
result. Checkers (``CHECKERS``; add your own with ``CHECKERS["name"] = fn(text, **params)``):

============================  ===============================================================
``words``                     ``min``/``max`` words (``\\w+`` runs)
``sentences``                 ``min``/``max`` sentences (split after ``.``, ``!``, ``?``)
``paragraphs``                exactly ``count`` paragraphs separated by ``***`` lines
``keywords_include``          every word/phrase of ``keywords`` appears (case-insensitive)
``keywords_exclude``          none of ``keywords`` appears
``keyword_frequency``         ``keyword`` appears ``relation`` (at_least/at_most/exactly) ``count``
``letter_frequency``          ``letter`` appears ``relation`` ``count`` times
``json_format``               the whole response (``` fences allowed) is valid JSON
``lowercase``/``uppercase``   every letter is lower/upper case
``bullet_count``              exactly ``count`` markdown bullets (``* `` or ``- `` lines)
``title``                     a title in double angular brackets ``<<…>>``
``end_phrase``                ends with ``phrase`` exactly (trailing whitespace ignored)
``start_phrase``              starts with ``phrase``
``no_commas``                 no ``,``
``placeholders``              at least ``count`` ``[placeholder]``s
``quotation``                 wrapped in double quotes
``postscript``                contains a line starting with ``marker`` (default ``P.S.``)
``highlighted_sections``      at least ``count`` ``*highlighted*`` sections
============================  ===============================================================
"""
from __future__ import annotations

import json
import re
from typing import Callable

from .base import Environment, final_text, register

__all__ = ["CHECKERS", "check_constraints", "InstructionEnv"]


def _in_range(n: int, min: int | None = None, max: int | None = None) -> bool:  # noqa: A002
    return (min is None or n >= min) and (max is None or n <= max)


def _relation(n: int, relation: str, count: int) -> bool:
    return {"at_least": n >= count, "at_most": n <= count, "exactly": n == count,
            "less_than": n < count}[relation]


def _phrase_count(text: str, phrase: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(phrase.lower()) + r"(?!\w)", text.lower()))


def words(text, min=None, max=None):  # noqa: A002
    return _in_range(len(re.findall(r"\w+", text)), min, max)


def sentences(text, min=None, max=None):  # noqa: A002
    parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]
    return _in_range(len(parts), min, max)


def paragraphs(text, count):
    parts = [p for p in re.split(r"\s*\n\s*\*\*\*\s*\n\s*", text.strip()) if p.strip()]
    return len(parts) == count


def keywords_include(text, keywords):
    return all(_phrase_count(text, k) > 0 for k in keywords)


def keywords_exclude(text, keywords):
    return all(_phrase_count(text, k) == 0 for k in keywords)


def keyword_frequency(text, keyword, count, relation="at_least"):
    return _relation(_phrase_count(text, keyword), relation, count)


def letter_frequency(text, letter, count, relation="at_least"):
    return _relation(text.lower().count(letter.lower()), relation, count)


def json_format(text):
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", t, flags=re.S | re.I)
    try:
        json.loads(m.group(1) if m else t)
    except (json.JSONDecodeError, ValueError):
        return False
    return True


def lowercase(text):
    return text == text.lower() and any(c.isalpha() for c in text)


def uppercase(text):
    return text == text.upper() and any(c.isalpha() for c in text)


def bullet_count(text, count):
    return len(re.findall(r"^\s*[*-]\s+\S", text, flags=re.M)) == count


def title(text):
    return bool(re.search(r"<<[^<>\n]*\S[^<>\n]*>>", text))


def end_phrase(text, phrase):
    return text.rstrip().endswith(phrase)


def start_phrase(text, phrase):
    return text.lstrip().startswith(phrase)


def no_commas(text):
    return "," not in text


def placeholders(text, count):
    return len(re.findall(r"\[[^\[\]\n]+\]", text)) >= count


def quotation(text):
    t = text.strip()
    return len(t) >= 2 and t[0] == '"' and t[-1] == '"'


def postscript(text, marker="P.S."):
    return bool(re.search(r"^\s*" + re.escape(marker), text, flags=re.M))


def highlighted_sections(text, count):
    return len(re.findall(r"\*[^\n*]+\*", text)) >= count


CHECKERS: dict[str, Callable[..., bool]] = {f.__name__: f for f in (
    words, sentences, paragraphs, keywords_include, keywords_exclude, keyword_frequency,
    letter_frequency, json_format, lowercase, uppercase, bullet_count, title, end_phrase,
    start_phrase, no_commas, placeholders, quotation, postscript, highlighted_sections)}


def check_constraints(text: str, constraints: list[dict]) -> list[bool]:
    """One bool per constraint (an unknown type raises ``KeyError``: a broken task file)."""
    out = []
    for c in constraints:
        params = {k: v for k, v in c.items() if k != "type"}
        out.append(bool(CHECKERS[c["type"]](text, **params)))
    return out


@register("instruction")
class InstructionEnv(Environment):
    """No tools; the reward checks the final answer against the task's constraints."""

    def reward(self, final_message, trajectory: list[dict]) -> dict:
        constraints = self.task["constraints"]
        results = check_constraints(final_text(final_message), constraints)
        frac = sum(results) / len(results) if results else 1.0
        comps = {"fraction": frac}
        comps.update({f"{i}:{c['type']}": float(r) for i, (c, r) in
                      enumerate(zip(constraints, results))})
        return {"outcome": float(all(results)), "process": None, "components": comps}
