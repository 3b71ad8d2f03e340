"""Search domain: ``search(query)`` and ``open(doc_id)`` over a corpus; answer-match reward.

Backends: :class:`LocalSearch` (a JSONL corpus ``{"id", "title", "text"}`` indexed with
``bm25s``) or :class:`HTTPSearch` (a user's service: a URL template such as
``http://host:8000/search?q={query}&k={k}`` answering a JSON list of ``{"id", "title", "text"}``
(or ``{"results": [...]}``), and optionally ``open_url`` ``http://host:8000/doc/{doc_id}``).

Task fields: ``prompt``, ``answers`` (gold strings). The model answers in
``<answer>…</answer>`` (else the whole final content counts).

Reward (``SearchConfig``): ``score`` = normalised exact match (``metric="em"``, default) or token
F1 (``"f1"``) against the best gold answer (SQuAD normalisation: lower case, punctuation and
articles removed, whitespace collapsed), then::

    outcome = max(0, score - round_penalty * max(0, rounds - max_free_rounds)
                           - repeat_penalty * repeated_queries)

``rounds`` = assistant turns that called tools; ``repeated_queries`` = search calls whose
normalised query was already searched in the episode. Defaults: ``max_free_rounds=8`` (K),
``round_penalty=0.05``, ``repeat_penalty=0.1``.
"""
from __future__ import annotations

import json
import os
import re
import string
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from .base import (TASKS_DIR, Environment, call_name_args, final_text, function_tool, register,
                   tool_calls_in)

__all__ = ["SearchConfig", "SearchEnv", "LocalSearch", "HTTPSearch", "normalize_answer",
           "exact_match", "token_f1", "extract_answer"]


@dataclass
class SearchConfig:
    metric: str = "em"
    """``"em"`` (normalised exact match) or ``"f1"`` (token F1)."""
    max_free_rounds: int = 8
    """K: tool rounds allowed before the linear penalty starts."""
    round_penalty: float = 0.05
    """Subtracted per tool round beyond K."""
    repeat_penalty: float = 0.1
    """Subtracted per repeated (normalised) search query."""
    top_k: int = 5
    """Results returned by one search."""
    snippet_chars: int = 300
    """Characters of each result's text shown by ``search``."""
    open_chars: int = 4000
    """Characters of a document shown by ``open``."""


class Backend(Protocol):
    def search(self, query: str, k: int) -> list[dict]: ...
    def open(self, doc_id: str) -> dict | None: ...


class LocalSearch:
    """BM25 (``bm25s``) over an in-memory corpus of ``{"id", "title", "text"}`` documents."""

    def __init__(self, docs: list[dict]):
        import bm25s

        self._bm25s = bm25s
        self.docs = list(docs)
        self.by_id = {str(d["id"]): d for d in self.docs}
        self.index = bm25s.BM25()
        texts = [f"{d.get('title', '')}\n{d.get('text', '')}" for d in self.docs]
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                         show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str) -> "LocalSearch":
        with open(path, encoding="utf-8") as f:
            return cls([json.loads(ln) for ln in f if ln.strip()])

    def search(self, query: str, k: int) -> list[dict]:
        toks = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        k = min(k, len(self.docs))
        if k == 0:
            return []
        idx, scores = self.index.retrieve(toks, k=k, show_progress=False)
        return [self.docs[int(i)] for i, s in zip(idx[0], scores[0]) if s > 0]

    def open(self, doc_id: str) -> dict | None:
        return self.by_id.get(str(doc_id))


class HTTPSearch:
    """A user's HTTP search service (``urllib``; no extra dependency)."""

    def __init__(self, search_url: str, open_url: str | None = None, timeout_s: float = 10.0,
                 headers: dict | None = None):
        self.search_url, self.open_url = search_url, open_url
        self.timeout_s, self.headers = timeout_s, dict(headers or {})

    def _get(self, url: str):
        req = urllib.request.Request(url, headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def search(self, query: str, k: int) -> list[dict]:
        data = self._get(self.search_url.format(query=urllib.parse.quote(query), k=k))
        if isinstance(data, dict):
            data = data.get("results", [])
        return list(data)[:k]

    def open(self, doc_id: str) -> dict | None:
        if not self.open_url:
            return None
        return self._get(self.open_url.format(doc_id=urllib.parse.quote(str(doc_id))))


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: list[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def token_f1(pred: str, golds: list[str]) -> float:
    best = 0.0
    p = normalize_answer(pred).split()
    for g in golds:
        gt = normalize_answer(g).split()
        common = sum((Counter(p) & Counter(gt)).values())
        if common:
            prec, rec = common / len(p), common / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
        elif not p and not gt:
            best = 1.0
    return best


def extract_answer(text: str) -> str:
    """The last ``<answer>…</answer>`` block, else the whole text."""
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    return (found[-1] if found else text).strip()


@register("search")
class SearchEnv(Environment):
    """``search``/``open`` tools over a backend (default: the bundled corpus)."""

    def __init__(self, config: SearchConfig | None = None, backend: Backend | None = None):
        super().__init__(config or SearchConfig())
        self.backend = backend or LocalSearch.from_jsonl(
            os.path.join(TASKS_DIR, "search_corpus.jsonl"))

    def tools(self) -> list[dict]:
        return [
            function_tool("search", "Search the document collection; returns ids, titles and "
                          "snippets.", {"query": {"type": "string"}}, ["query"]),
            function_tool("open", "Read a document by its id.", {"doc_id": {"type": "string"}},
                          ["doc_id"]),
        ]

    def step(self, tool_call: dict) -> str:
        name, args = call_name_args(tool_call)
        cfg = self.config
        if not isinstance(args, dict):
            return "Error: arguments must be an object."
        try:
            if name == "search":
                if not isinstance(args.get("query"), str) or not args["query"].strip():
                    return "Error: search needs a non-empty string 'query'."
                hits = self.backend.search(args["query"], cfg.top_k)
                if not hits:
                    return "No results."
                return "\n\n".join(f"[{h['id']}] {h.get('title', '')}\n"
                                   f"{str(h.get('text', ''))[:cfg.snippet_chars]}" for h in hits)
            if name == "open":
                doc = self.backend.open(str(args.get("doc_id", "")))
                if doc is None:
                    return f"Error: no document with id {args.get('doc_id')!r}."
                return f"[{doc['id']}] {doc.get('title', '')}\n{str(doc.get('text', ''))[:cfg.open_chars]}"
        except OSError as exc:  # HTTP backend failures are the model's observation, not a crash
            return f"Error: search service unavailable ({exc})."
        return f"Error: unknown tool {name!r}; available: search, open."

    def reward(self, final_message, trajectory: list[dict]) -> dict:
        cfg = self.config
        golds = [str(a) for a in self.task.get("answers", [])]
        pred = extract_answer(final_text(final_message))
        em, f1 = exact_match(pred, golds), token_f1(pred, golds)
        score = em if cfg.metric == "em" else f1
        rounds = tool_calls_in(trajectory)
        seen, repeats = set(), 0
        for turn in rounds:
            for call in turn:
                name, args = call_name_args(call)
                if name == "search" and isinstance(args, dict):
                    q = normalize_answer(str(args.get("query", "")))
                    repeats += q in seen
                    seen.add(q)
        over = max(0, len(rounds) - cfg.max_free_rounds)
        penalty = cfg.round_penalty * over + cfg.repeat_penalty * repeats
        return {"outcome": max(0.0, score - penalty), "process": None,
                "components": {"em": em, "f1": f1, "rounds": len(rounds),
                               "repeated_queries": repeats, "penalty": penalty}}
