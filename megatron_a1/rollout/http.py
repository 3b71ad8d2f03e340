"""Generation over HTTP: vLLM's and SGLang's token-in/token-out endpoints.

:class:`HTTPEngine` implements :class:`~megatron_a1.rollout.engine.Engine` against one inference
server. Prompts are token ids and the sampled ids come back as ids with the server's
log-probability of each; no text is tokenised anywhere on the way.

vLLM — ``POST /inference/v1/generate`` (``vllm/entrypoints/serve/disagg/protocol.py``:
``GenerateRequest``/``GenerateResponse``; ``serving.py``: ``ServingTokens``)::

    request   {"token_ids": [int], "sampling_params": {"temperature", "top_p", "top_k",
               "max_tokens", "stop_token_ids", "seed"?, "logprobs": 0, "detokenize": false},
               "model"?: str, "stream": false}
    response  {"request_id", "choices": [{"index": 0, "token_ids": [int],
               "logprobs": {"content": [{"token": "token_id:<id>", "logprob": float, ...}]},
               "finish_reason": "stop" | "length" | "abort"}], ...}

  ``logprobs: 0`` asks for the sampled token's log-probability only (vLLM clamps it at -9999).
  vLLM's default ``--logprobs-mode raw_logprobs`` computes it from the raw logits, before
  temperature/top-p/top-k: the policy's own log-probability, as :class:`Generation` documents.

SGLang — ``POST /generate`` (``GenerateReqInput`` in ``srt/managers/io_struct.py``; the
sampling fields in docs ``basic_usage/sampling_params``)::

    request   {"input_ids": [int], "sampling_params": {"temperature", "top_p", "top_k",
               "max_new_tokens", "stop_token_ids", "sampling_seed"?, "no_stop_trim": true,
               "skip_special_tokens": false}, "return_logprob": true, "stream": false}
    response  {"text", "output_ids": [int], "meta_info": {"finish_reason": {"type": "stop" |
               "length" | "abort", ...}, "output_token_logprobs": [[logprob, id, text|null]],
               "weight_version": str, ...}}

  The ids are read from ``output_token_logprobs`` (and checked against ``output_ids`` when
  present). SGLang's log-probabilities are taken after temperature scaling unless the server
  runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` — set it (``examples/serving/``).

Both servers also stop at the model's EOS ids (``generation_config.json``); for Qwen3.5 those are
the ids the agent loop passes as ``stop_token_ids`` anyway.

Weight version. SGLang reports ``meta_info.weight_version`` (set by ``update_weights_from_disk``);
vLLM's response carries none (``GET /weight_info`` has it), so unless the response has a
top-level ``weight_version`` (our :mod:`megatron_a1.rollout.server` adds one) a generation is
tagged with the client's :attr:`HTTPEngine.weight_version` when its request was sent, which the
weight-sync client (:mod:`megatron_a1.rollout.weight_sync`) bumps after each successful update.
A version that is not an integer (SGLang's initial ``"default"``) also falls back to the client's.

Prompt log-probs (:meth:`HTTPEngine.prompt_topk`: a served OPD teacher's top-k next-token
distribution at every position of a given sequence, ``megatron_a1/training/opd.py``).

vLLM — ``POST /v1/completions`` (``CompletionRequest``/``CompletionResponse`` in
vLLM's OpenAI protocol module; ``-inf`` clamped to -9999 by ``clamp_prompt_logprobs``)::

    request   {"prompt": [int], "max_tokens": 1, "prompt_logprobs": k, "temperature": 0,
               "model"?: str}
    response  {"id", "object": "text_completion", "choices": [{"index": 0, "text",
               "finish_reason", "prompt_logprobs": [null, {"<id>": {"logprob": float,
               "rank": int, "decoded_token": str|null}}, ...]}], "usage", ...}

  One entry per prompt position: entry ``j >= 1`` is the distribution after ``tokens[:j]``
  (predicting token ``j``), entry 0 is null. Each holds the top-k ids (ranks 1..k) and the
  actual prompt token with its vocabulary rank (``1 +`` the number of ids more likely), so k or
  k + 1 entries; the client keeps the k most likely. The server needs ``--max-logprobs >= k``;
  its default ``--logprobs-mode raw_logprobs`` computes them from the raw logits.

SGLang — ``POST /generate`` (``GenerateReqInput``)::

    request   {"input_ids": [int], "sampling_params": {"max_new_tokens": 1, "temperature": 0},
               "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": k,
               "stream": false}
    response  {"meta_info": {"input_top_logprobs": [null, [[logprob, id, text|null], ...], ...],
               "input_token_logprobs": [[logprob|null, id, text|null]], ...}, ...}

  ``input_top_logprobs[j]`` is the top-k after ``tokens[:j]`` (entry 0 null or empty). SGLang
  runs a greedy request (temperature 0) at temperature 1, so these are the unscaled log-probs
  (as with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, which the recipes set).

Both answers become, per sequence of n tokens, ``ids [n-1, k]`` and ``logprobs [n-1, k]`` with
row ``t`` the distribution predicting token ``t + 1``, sorted by descending log-prob (ties: lower
id). Log-probs differ from the logits by one constant per row, which the SVA loss's top-k
renormalisation cancels, so they stand in for the teacher's logits there.

Failures. Each request has ``timeout_s`` (no byte from the server for that long fails the
attempt). Connection errors, timeouts, 5xx, 408/429 and server-aborted requests
(``finish_reason`` ``"abort"``: vLLM's ``/pause?mode=abort`` and SGLang's
``pause_generation``/``abort_all_requests`` abort what is running) are retried ``max_retries``
times, waiting ``backoff_s * 2**k`` before retry ``k+1``; then :class:`EngineUnavailableError`.
Any other 4xx raises :class:`EngineHTTPError` at once, with the server's message. A response
that does not follow the protocol raises :class:`EngineProtocolError` (not retried).
"""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from .engine import Generation, SamplingParams

BACKENDS = ("vllm", "sglang")
RETRYABLE_4XX = (408, 429)


class EngineError(RuntimeError):
    """A generation or control request to an inference server failed."""


class EngineHTTPError(EngineError):
    """The server answered with an error status that is not retried (a 4xx)."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {message}")
        self.status, self.message, self.url = status, message, url


class EngineUnavailableError(EngineError):
    """Every attempt failed with a retryable error (connection, timeout, 5xx, abort)."""


class EngineProtocolError(EngineError):
    """The server answered 200 with a body that does not follow the protocol."""


class _Retryable(Exception):
    """One attempt failed in a way worth trying again."""


def error_message(body: bytes) -> str:
    """The human message of an error body: vLLM's ``{"error": {"message"}}`` (or older
    ``{"message"}``), FastAPI's ``{"detail"}``, SGLang's ``{"success": false, "message"}``."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:2000] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("detail", "message", "error"):
            if obj.get(key):
                return str(obj[key])
    return text[:2000]


class HTTPClient:
    """JSON over HTTP to one server, with the retry policy above (stdlib ``urllib``)."""

    def __init__(self, base_url: str, *, timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 1.0):
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need max_retries >= 0, timeout_s > 0, backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s

    def request(self, method: str, path: str, body: Any = None, *,
                timeout_s: float | None = None, check: Callable[[Any, Any], Any] | None = None,
                before: Callable[[], Any] | None = None):
        """The decoded JSON answer (``None`` for an empty body), retried as documented.

        With ``check``, what ``check(answer, before())`` returns instead (``before`` runs just
        before each attempt is sent); ``check`` may raise :class:`_Retryable` (e.g. for a
        server-aborted generation) to retry the request like a transport failure.
        """
        url = self.base_url + path
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                token = before() if before is not None else None
                answer = self._once(method, url, body, timeout_s or self.timeout_s)
                return answer if check is None else check(answer, token)
            except _Retryable as e:
                last = e
        raise EngineUnavailableError(
            f"{method} {url} failed {self.max_retries + 1} time(s); last error: {last}")

    def _once(self, method: str, url: str, body: Any, timeout_s: float):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            msg = error_message(e.read() or b"")
            if e.code >= 500 or e.code in RETRYABLE_4XX:
                raise _Retryable(f"HTTP {e.code}: {msg}") from None
            raise EngineHTTPError(e.code, msg, url) from None
        except urllib.error.URLError as e:  # connection refused, DNS, timeout while connecting
            raise _Retryable(f"{type(e.reason).__name__}: {e.reason}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"{type(e).__name__}: {e or 'timed out'}") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineProtocolError(
                f"{method} {url}: answer is not JSON: {raw[:200]!r}") from None


def _version(value, fallback: int) -> int:
    """A server's weight version as our integer version (``fallback`` if it is not one)."""
    if isinstance(value, bool):
        return fallback
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return fallback


# ----------------------------------------------------------------------------------------------
# Wire formats
# ----------------------------------------------------------------------------------------------
def vllm_request(prompt: list[int], s: SamplingParams, model: str | None = None) -> dict:
    sp = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
          "max_tokens": s.max_tokens, "stop_token_ids": list(s.stop_token_ids),
          "logprobs": 0, "detokenize": False}
    if s.seed is not None:
        sp["seed"] = s.seed
    body = {"token_ids": list(prompt), "sampling_params": sp, "stream": False}
    if model is not None:
        body["model"] = model
    return body


def sglang_request(prompt: list[int], s: SamplingParams) -> dict:
    sp = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
          "max_new_tokens": s.max_tokens, "stop_token_ids": list(s.stop_token_ids),
          "no_stop_trim": True, "skip_special_tokens": False}
    if s.seed is not None:
        sp["sampling_seed"] = s.seed
    return {"input_ids": list(prompt), "sampling_params": sp, "return_logprob": True,
            "stream": False}


def _aborted(reason: str):
    raise _Retryable(f"the server aborted the request ({reason})")


def parse_vllm(answer, version: int) -> Generation:
    try:
        (choice,) = answer["choices"]
        if choice.get("finish_reason") == "abort":
            _aborted("finish_reason 'abort'")
        ids = [int(t) for t in choice["token_ids"]]
        content = (choice.get("logprobs") or {}).get("content")
        if content is None:
            raise EngineProtocolError("vLLM answer has no logprobs (was logprobs=0 sent?)")
        lps = [float(c["logprob"]) for c in content]
        finish = choice.get("finish_reason") or "stop"
    except (KeyError, TypeError, ValueError) as e:
        raise EngineProtocolError(f"malformed vLLM generate answer ({e!r}): {answer!r:.300}")
    if len(lps) != len(ids):
        raise EngineProtocolError(f"vLLM answer has {len(ids)} ids but {len(lps)} logprobs")
    return Generation(token_ids=ids, logprobs=lps, finish_reason=finish,
                      weight_version=_version(answer.get("weight_version"), version))


def parse_sglang(answer, version: int) -> Generation:
    try:
        meta = answer["meta_info"]
        reason = meta.get("finish_reason") or {}
        finish = reason.get("type") if isinstance(reason, dict) else str(reason)
        if finish == "abort":
            _aborted(f"finish_reason {reason!r}")
        pairs = meta["output_token_logprobs"]
        lps = [float(p[0]) for p in pairs]
        ids = [int(p[1]) for p in pairs]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EngineProtocolError(f"malformed SGLang generate answer ({e!r}): {answer!r:.300}")
    if "output_ids" in answer and list(answer["output_ids"]) != ids:
        raise EngineProtocolError("SGLang output_ids differ from the ids in output_token_logprobs")
    return Generation(token_ids=ids, logprobs=lps, finish_reason=finish or "stop",
                      weight_version=_version(meta.get("weight_version"), version))


def vllm_prompt_request(tokens: list[int], k: int, model: str | None = None) -> dict:
    body = {"prompt": list(tokens), "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0}
    if model is not None:
        body["model"] = model
    return body


def sglang_prompt_request(tokens: list[int], k: int) -> dict:
    return {"input_ids": list(tokens), "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
            "stream": False}


def _topk_rows(rows: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (id, log-prob) candidates → the k most likely, descending (ties: lower id).

    Returns ``ids [len(rows), k] int64`` and ``logprobs [len(rows), k] float32``. Raises
    ``ValueError`` for a row with fewer than k candidates, a repeated id or a NaN.
    """
    width = max([k, *map(len, rows)])
    ids = np.full((len(rows), width), np.iinfo(np.int64).max, dtype=np.int64)
    lps = np.full((len(rows), width), -np.inf, dtype=np.float64)
    for t, row in enumerate(rows):
        if len(row) < k:
            raise ValueError(f"position {t + 1} has {len(row)} log-probs, expected at least {k}")
        if len({i for i, _ in row}) != len(row):
            raise ValueError(f"position {t + 1} repeats a token id")
        for j, (i, lp) in enumerate(row):
            if i < 0 or math.isnan(lp):
                raise ValueError(f"position {t + 1}: bad entry (id {i}, log-prob {lp})")
            ids[t, j], lps[t, j] = i, lp
    order = np.lexsort((ids, -lps), axis=-1)[:, :k]  # last key first: log-prob, then id
    return (np.take_along_axis(ids, order, -1),
            np.take_along_axis(lps, order, -1).astype(np.float32))


def _prompt_rows(entries, n: int, what: str) -> list:
    """The n - 1 per-position entries after the first (which predicts nothing)."""
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"{what} must list one entry per prompt token ({n}), got {got}")
    return entries[1:]


def parse_vllm_prompt_topk(answer, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``ids [n-1, k]``, ``logprobs [n-1, k]`` from a vLLM ``/v1/completions`` answer."""
    try:
        (choice,) = answer["choices"]
        if choice.get("finish_reason") == "abort":
            _aborted("finish_reason 'abort'")
        rows = [[(int(i), float(v["logprob"])) for i, v in entry.items()]
                for entry in _prompt_rows(choice["prompt_logprobs"], n, "prompt_logprobs")]
        return _topk_rows(rows, k)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EngineProtocolError(
            f"malformed vLLM prompt_logprobs answer ({e!r}): {answer!r:.300}") from None


def parse_sglang_prompt_topk(answer, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``ids [n-1, k]``, ``logprobs [n-1, k]`` from an SGLang ``/generate`` answer."""
    try:
        meta = answer["meta_info"]
        reason = meta.get("finish_reason") or {}
        if (reason.get("type") if isinstance(reason, dict) else reason) == "abort":
            _aborted(f"finish_reason {reason!r}")
        rows = [[(int(e[1]), float(e[0])) for e in entry]
                for entry in _prompt_rows(meta["input_top_logprobs"], n, "input_top_logprobs")]
        return _topk_rows(rows, k)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise EngineProtocolError(
            f"malformed SGLang input_top_logprobs answer ({e!r}): {answer!r:.300}") from None


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class HTTPEngine:
    """:class:`Engine` over one vLLM or SGLang server; ``max_in_flight`` requests at a time.

    Thread-safe: ``generate`` may be called from several threads (they share the pool).
    ``weight_version`` is the client's view of the server's weights (see the module docstring);
    :mod:`megatron_a1.rollout.weight_sync` updates it.
    """

    def __init__(self, base_url: str, *, backend: str = "vllm", timeout_s: float = 600.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_in_flight: int = 64,
                 model: str | None = None, weight_version: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.client = HTTPClient(base_url, timeout_s=timeout_s, max_retries=max_retries,
                                 backoff_s=backoff_s)
        self.backend, self.model, self.max_in_flight = backend, model, max_in_flight
        self.weight_version = weight_version
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.client.base_url

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        """One generation per prompt, in prompt order; raises the first failure (in order)."""
        return self._map(self.generate_one, prompts, sampling)

    def generate_one(self, prompt: list[int], sampling: SamplingParams) -> Generation:
        """One request, retried as documented (blocking)."""
        if self.backend == "vllm":
            path, body = "/inference/v1/generate", vllm_request(prompt, sampling, self.model)
            parse = parse_vllm
        else:
            path, body = "/generate", sglang_request(prompt, sampling)
            parse = parse_sglang
        # Fallback tag: the client's version when the attempt was sent. The vLLM weight sync
        # sets the new version as soon as the server is paused, so an attempt sent from then on
        # (held by the server until resume, or re-sent after an abort) carries the new version
        # and one sent before it was drained or aborted under the old weights.
        # Parsed inside the retry loop, so that a server-aborted generation is sent again.
        return self.client.request("POST", path, body, check=parse,
                                   before=lambda: self.weight_version)

    def prompt_topk(self, sequences: list[list[int]], k: int
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The server model's top-k next-token distribution at every position of each sequence.

        For a sequence of n tokens: ``ids [n-1, k] int64`` and ``logprobs [n-1, k] float32``,
        row ``t`` the distribution after ``tokens[:t+1]`` (predicting token ``t+1``), sorted by
        descending log-prob (ties: lower id). One request per sequence (a sequence of one token
        needs none), ``max_in_flight`` at a time; in sequence order, the first failure raised.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if any(not seq for seq in sequences):
            raise ValueError("every sequence needs at least one token")
        return self._map(self.prompt_topk_one, sequences, k)

    def _map(self, one, items: list, *args) -> list:
        """``one(item, *args)`` for every item on the pool, in order; the first failure (in
        order) is raised and the requests not yet started are cancelled."""
        if not items:
            return []
        pool = self._executor()
        futures = [pool.submit(one, item, *args) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def prompt_topk_one(self, tokens: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence of :meth:`prompt_topk` (blocking, retried as documented)."""
        n = len(tokens)
        if n < 2:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if self.backend == "vllm":
            path, body = "/v1/completions", vllm_prompt_request(tokens, k, self.model)
            parse = parse_vllm_prompt_topk
        else:
            path, body = "/generate", sglang_prompt_request(tokens, k)
            parse = parse_sglang_prompt_topk
        return self.client.request("POST", path, body, check=lambda a, _: parse(a, n, k))

    def health(self) -> bool:
        """Whether ``GET /health`` answers 200 (one attempt, no retries)."""
        try:
            self.client._once("GET", self.base_url + "/health", None,
                              min(self.client.timeout_s, 10.0))
            return True
        except (_Retryable, EngineError):
            return False

    def wait_until_healthy(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"{self.base_url} not healthy after {timeout_s}s")
            time.sleep(poll_s)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_in_flight,
                                                thread_name_prefix="http-engine")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
