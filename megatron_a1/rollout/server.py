"""Serve any :class:`~megatron_a1.rollout.engine.Engine` over HTTP, speaking vLLM's and SGLang's
token-in/token-out protocols (the subset :mod:`megatron_a1.rollout.http` and
:mod:`megatron_a1.rollout.weight_sync` use), so the CPU demo and the tests run the same client
code as a GPU cluster.

``make_server(engine, host, port, reload=...)`` returns a stdlib ``ThreadingHTTPServer`` (call
``serve_forever()``; port 0 picks a free one: ``server.server_address[1]``). Connections are
served concurrently, but the engine runs one request at a time (an in-process engine is not
thread-safe); waiting requests queue in arrival order.

Routes (request/response fields as documented in :mod:`megatron_a1.rollout.http`):

========================================  ======================================================
``GET  /health``                          200 ``{}``
``POST /inference/v1/generate``           vLLM ``GenerateRequest`` → ``GenerateResponse``, plus
                                          a top-level ``weight_version`` (our extension)
``POST /generate``                        SGLang, one ``input_ids`` list per request; with
                                          ``return_logprob``, ``logprob_start_len: 0`` and
                                          ``top_logprobs_num: k``, also the prompt's
                                          ``input_token_logprobs``/``input_top_logprobs``
``POST /v1/completions``                  vLLM prompt scoring only: ``prompt`` token ids,
                                          ``prompt_logprobs: k``, ``max_tokens`` 0 or 1
                                          (``temperature``, ``model`` accepted) →
                                          ``choices[0].prompt_logprobs``
``POST /pause?mode=abort|wait|keep``      vLLM pause; ``POST /resume``; ``GET /is_paused``
``POST /pause_generation {"mode"}``       SGLang pause; ``POST /continue_generation``
``POST /collective_rpc``                  vLLM, only ``{"method": "reload_weights", "kwargs":
                                          {"weights_path": DIR}}``: reload, version + 1
``POST /update_weight_version``           vLLM ``{"new_version": "N"}``; ``GET /weight_info``
``POST /update_weights_from_disk``        SGLang ``{"model_path", "weight_version"?}``
``GET  /model_info``                      SGLang ``{"weight_version", ...}``
``POST /init_weights_update_group``       SGLang distributed updates
``POST /update_weights_from_distributed`` (:mod:`megatron_a1.rollout.weight_transfer`): join the
``POST /destroy_weights_update_group``    sender's group, receive its broadcasts, load them
``GET  /get_server_info``                 ``{"tp_size": 1, "pp_size": 1, "dp_size": 1, ...}``
========================================  ======================================================

Pause semantics (vLLM's, as ``AsyncLLM.pause_generation`` documents them): while paused, new
generate requests wait until resume (the client's timeout still applies). ``mode=wait`` returns
once the running request finished; ``mode=abort`` also answers every queued, not yet started
request with ``finish_reason: "abort"`` (SGLang: ``{"type": "abort"}``), which the client re-sends;
the running request cannot be interrupted mid-generation here, so it finishes first (vLLM would
abort it too). ``mode=keep`` returns at once and leaves the queue as it is. SGLang's ``abort``
maps to ``abort``, ``retract`` and ``in_place`` to ``keep``.

Prompt log-probs (the two scoring forms above) need an engine with ``prompt_logprobs(tokens, k)``
(:meth:`~megatron_a1.rollout.embedded.EmbeddedEngine.prompt_logprobs`); they queue and pause like
generations, and an aborted one answers ``finish_reason`` ``"abort"`` with no log-probs. vLLM's
per-position dict holds the top-k (ranks 1..k) plus the actual prompt token with its vocabulary
rank when it is outside the top-k; ``decoded_token`` is null (no tokenizer here). SGLang's
``output_top_logprobs`` (top-k of generated tokens) is not implemented: ``top_logprobs_num``
needs ``logprob_start_len: 0``.

Weight updates call ``reload(path)``, which must load the weights in ``path`` into the served
engine (or return a new engine to serve from then on); it runs when no generation is running,
paused or not. Without ``reload`` the update routes answer 400. Errors: a malformed request or an
engine ``ValueError`` (e.g. a token id outside the vocabulary) answers 400, any other engine
exception 500, with the message as vLLM formats it: ``{"error": {"message", "type", "code"}}``.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from .engine import Engine, Generation, SamplingParams

_PAUSE_MODES = {"abort": "abort", "wait": "wait", "keep": "keep",  # vLLM
                "retract": "keep", "in_place": "keep"}  # SGLang


class BadRequest(ValueError):
    """The request does not follow the protocol (answered 400)."""


class _Aborted(Exception):
    pass


class ServedEngine:
    """The engine, its version and the pause/queue state shared by the handler threads."""

    def __init__(self, engine: Engine, reload: Callable[[str], Engine | None] | None = None,
                 load_tensors: Callable[[dict], bool] | None = None):
        self.engine, self.reload_fn, self.load_tensors_fn = engine, reload, load_tensors
        self.groups: dict[str, Any] = {}  # weight-transfer process groups by name
        self.received: dict[str, Any] = {}  # tensors broadcast so far, by HF name
        self.cond = threading.Condition()
        self.busy = False  # a generation or a reload is running
        self.paused = False
        self.abort_epoch = 0  # bumped by pause(abort): requests queued before it are aborted
        self.queued = 0  # requests waiting for the engine (queue, or pause)
        self.hits: Counter[str] = Counter()  # requests received per path (for tests and logs)

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def _acquire(self, *, for_generation: bool) -> None:
        with self.cond:
            epoch = self.abort_epoch
            self.queued += 1
            try:
                while True:
                    if for_generation and self.abort_epoch != epoch:
                        raise _Aborted
                    if not self.busy and not (for_generation and self.paused):
                        break
                    self.cond.wait()
            finally:
                self.queued -= 1
            self.busy = True

    def _release(self) -> None:
        with self.cond:
            self.busy = False
            self.cond.notify_all()

    def generate(self, prompt: list[int], sampling: SamplingParams) -> tuple[Generation, int]:
        """(generation, weight version it was sampled with); raises :class:`_Aborted`."""
        self._acquire(for_generation=True)
        try:
            (g,) = self.engine.generate([prompt], sampling)
            return g, self.engine.weight_version
        finally:
            self._release()

    def score(self, prompt: list[int], k: int, sampling: SamplingParams | None):
        """(prompt log-probs, generation or None, weight version) for one scoring request:
        the engine's ``prompt_logprobs(prompt, k)``, then ``sampling`` continues the prompt
        (none when it is None or the prompt fills the context). Raises :class:`_Aborted`."""
        if not callable(getattr(self.engine, "prompt_logprobs", None)):
            raise BadRequest("this server's engine does not compute prompt log-probs")
        self._acquire(for_generation=True)
        try:
            top = self.engine.prompt_logprobs(prompt, k)
            g = None
            room = len(prompt) < getattr(self.engine, "max_context", float("inf"))
            if sampling is not None and sampling.max_tokens > 0 and room:
                (g,) = self.engine.generate([prompt], sampling)
            return top, g, self.engine.weight_version
        finally:
            self._release()

    def pause(self, mode: str) -> None:
        with self.cond:
            self.paused = True
            if mode == "abort":
                self.abort_epoch += 1
            self.cond.notify_all()
            if mode in ("abort", "wait"):
                while self.busy:
                    self.cond.wait()

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def reload(self, path: str, version: int | None) -> int:
        if self.reload_fn is None:
            raise BadRequest("this server was started without a weight loader")
        if not os.path.isdir(path):
            raise BadRequest(f"weights path is not a directory on the server: {path}")
        self._acquire(for_generation=False)
        try:
            old = self.engine.weight_version
            new_engine = self.reload_fn(path)
            if new_engine is not None:
                self.engine = new_engine
            return self._loaded(old, version)
        finally:
            self._release()

    def _loaded(self, old: int, version: int | None) -> int:
        """New weights are in: the engine's version becomes ``version``, or ``old`` + 1."""
        self.engine.weight_version = old + 1 if version is None else version
        return self.engine.weight_version

    def receive(self, group_name: str, names: list[str], dtypes: list[str],
                shapes: list[list[int]], version: int | None) -> int | None:
        """Receive one bucket of broadcast tensors; once they make a whole model, load them
        (between generations) and return the new version, else None."""
        import torch

        from .weight_transfer import broadcast

        if self.load_tensors_fn is None:
            raise BadRequest("this server was started without a weight loader")
        pg = self.groups.get(group_name)
        if pg is None:
            raise BadRequest(f"no weight update group {group_name!r}: call "
                             "/init_weights_update_group first")
        if not (len(names) == len(dtypes) == len(shapes)):
            raise BadRequest("names, dtypes and shapes must have the same length")
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty([int(x) for x in shape], dtype=getattr(torch, dtype))
            broadcast(pg, t)
            self.received[name] = t
        self._acquire(for_generation=False)
        try:
            if not self.load_tensors_fn(self.received):
                return None
            self.received = {}
            return self._loaded(self.engine.weight_version, version)
        finally:
            self._release()

    def set_version(self, version: int) -> None:
        with self.cond:
            self.engine.weight_version = version


# ----------------------------------------------------------------------------------------------
# Protocol translation
# ----------------------------------------------------------------------------------------------
def _token_ids(value, name: str) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        raise BadRequest(f"{name} must be a non-empty list of non-negative ints")
    return value


def _sampling(sp: Any, max_key: str, seed_key: str, default_max: int) -> SamplingParams:
    if not isinstance(sp, dict):
        raise BadRequest("sampling_params must be an object")
    try:
        top_k = int(sp.get("top_k", -1))
        return SamplingParams(
            temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
            top_k=-1 if top_k == 0 else top_k,  # vLLM: 0 and -1 both mean off
            max_tokens=int(sp.get(max_key) or default_max),
            stop_token_ids=[int(t) for t in sp.get("stop_token_ids") or []],
            seed=None if sp.get(seed_key) is None else int(sp[seed_key]))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad sampling_params: {e}") from None


_COMPLETION_FIELDS = {"model", "prompt", "prompt_logprobs", "max_tokens", "temperature", "stream"}


def _count(value, name: str) -> int | None:
    """A non-negative int field (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _input_logprobs_k(body: dict) -> int | None:
    """SGLang: the top-k asked for at every prompt position (0: the prompt tokens' own
    log-probs only), or None when the request wants no prompt log-probs."""
    start = body.get("logprob_start_len")
    k = _count(body.get("top_logprobs_num"), "top_logprobs_num") or 0
    if not body.get("return_logprob") or start in (None, -1):
        if k:
            raise BadRequest("top_logprobs_num is supported for the prompt only: send "
                             "return_logprob true with logprob_start_len 0")
        return None
    if start != 0:
        raise BadRequest(f"logprob_start_len must be 0 (every prompt position) or -1, got "
                         f"{start!r}")
    return k


def _version_arg(value) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise BadRequest(f"weight version must be an integer, got {value!r}") from None


def vllm_answer(g: Generation | None, version: int, want_logprobs: bool) -> dict:
    if g is None:
        choice = {"index": 0, "token_ids": [], "logprobs": None, "finish_reason": "abort"}
    else:
        content = [{"token": f"token_id:{t}", "logprob": max(lp, -9999.0), "bytes": None,
                    "top_logprobs": []} for t, lp in zip(g.token_ids, g.logprobs)]
        choice = {"index": 0, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                  "logprobs": {"content": content} if want_logprobs else None}
    return {"request_id": f"generate-tokens-{uuid.uuid4().hex}", "choices": [choice],
            "prompt_logprobs": None, "kv_transfer_params": None, "weight_version": str(version)}


def sglang_answer(g: Generation | None, version: int, prompt_len: int, want_logprobs: bool) -> dict:
    ids = [] if g is None else g.token_ids
    if g is None:
        reason = {"type": "abort", "message": "aborted by pause_generation"}
    elif g.finish_reason == "stop":
        reason = {"type": "stop", "matched": ids[-1] if ids else None}
    else:
        reason = {"type": g.finish_reason, "length": len(ids)}
    meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": prompt_len,
            "completion_tokens": len(ids), "weight_version": str(version)}
    if want_logprobs:
        meta["output_token_logprobs"] = [] if g is None else [
            [lp, t, None] for t, lp in zip(g.token_ids, g.logprobs)]
    return {"text": "", "output_ids": ids, "meta_info": meta}


def _logprob(value) -> float:
    return max(float(value), -9999.0)  # vLLM's clamp: JSON has no -inf


def vllm_prompt_logprobs(top, prompt: list[int]) -> list:
    """vLLM's ``prompt_logprobs``: null, then per position the top-k ``{"<id>": {"logprob",
    "rank", "decoded_token"}}`` plus the actual token when it is outside the top-k."""
    rows: list = [None]
    for t, (ids, lps) in enumerate(zip(top.ids.tolist(), top.logprobs.tolist())):
        row = {str(i): {"logprob": _logprob(lp), "rank": r + 1, "decoded_token": None}
               for r, (i, lp) in enumerate(zip(ids, lps))}
        row.setdefault(str(prompt[t + 1]), {"logprob": _logprob(top.token_logprobs[t]),
                                            "rank": int(top.token_ranks[t]),
                                            "decoded_token": None})
        rows.append(row)
    return rows


def vllm_completion_answer(top, g: Generation | None, prompt: list[int], version: int,
                           model: str | None, aborted: bool) -> dict:
    ids = [] if g is None else g.token_ids
    choice = {"index": 0, "text": "", "token_ids": ids, "logprobs": None, "stop_reason": None,
              "finish_reason": "abort" if aborted else (g.finish_reason if g else "length"),
              "prompt_logprobs": None if aborted else vllm_prompt_logprobs(top, prompt)}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model or "megatron-a1", "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                      "total_tokens": len(prompt) + len(ids)},
            "weight_version": str(version)}


def sglang_input_logprobs(top, prompt: list[int], k: int) -> dict:
    """SGLang's ``input_token_logprobs`` (and ``input_top_logprobs`` when ``k`` > 0), one entry
    per prompt token, the first predicting nothing."""
    meta = {"input_token_logprobs": [[None, prompt[0], None]] + [
        [_logprob(lp), tok, None] for lp, tok in zip(top.token_logprobs.tolist(), prompt[1:])]}
    if k:
        meta["input_top_logprobs"] = [None] + [
            [[_logprob(lp), i, None] for i, lp in zip(ids, lps)]
            for ids, lps in zip(top.ids.tolist(), top.logprobs.tolist())]
    return meta


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
def _error_body(status: int, message: str) -> dict:
    """vLLM's ``ErrorResponse`` shape."""
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "code": status}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "megatron-a1-serve/1"
    server: "EngineHTTPServer"

    def log_message(self, fmt, *args):  # quiet unless asked
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"JSON decode error: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        route = self.server.routes.get((method, url.path))
        self.server.state.hits[url.path] += 1
        if route is None:
            self._send(404, _error_body(404, f"no route {method} {url.path}"))
            return
        try:
            status, obj = route(self, parse_qs(url.query))
        except ValueError as e:  # BadRequest, or the engine rejecting the request (as vLLM)
            status, obj = 400, _error_body(400, str(e))
        except Exception as e:  # noqa: BLE001 - the engine's failure is the client's 500
            status, obj = 500, _error_body(500, f"{type(e).__name__}: {e}")
        try:
            self._send(status, obj)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    # --- vLLM ---------------------------------------------------------------------------------
    def vllm_generate(self, query):
        body = self._body()
        prompt = _token_ids(body.get("token_ids"), "token_ids")
        sp = body.get("sampling_params") or {}
        sampling = _sampling(sp, "max_tokens", "seed", default_max=16)
        g, v = self._generate(prompt, sampling)
        return 200, vllm_answer(g, v, want_logprobs=sp.get("logprobs") is not None)

    def vllm_completions(self, query):
        body = self._body()
        extra = sorted(set(body) - _COMPLETION_FIELDS)
        if extra:
            raise BadRequest(f"unsupported field(s) {extra}: this server's /v1/completions only "
                             "scores prompts (prompt token ids, prompt_logprobs, max_tokens <= 1, "
                             "temperature, model)")
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                       and isinstance(prompt[0], (str, list))):
            raise BadRequest("prompt must be one list of token ids (no tokenizer, no batches)")
        prompt = _token_ids(prompt, "prompt")
        k = _count(body.get("prompt_logprobs"), "prompt_logprobs")
        if k is None:
            raise BadRequest("prompt_logprobs is required: this server's /v1/completions only "
                             "scores prompts")
        max_tokens = _count(body.get("max_tokens"), "max_tokens")
        if max_tokens is None or max_tokens > 1:
            raise BadRequest(f"max_tokens must be 0 or 1 here (prompt scoring), got {max_tokens}")
        if body.get("stream"):
            raise BadRequest("stream is not supported")
        sampling = _sampling({"temperature": body.get("temperature", 1.0)}, "max_tokens", "seed",
                             default_max=1) if max_tokens else None
        try:
            top, g, v = self.server.state.score(prompt, k, sampling)
            aborted = False
        except _Aborted:
            top, g, v, aborted = None, None, self.server.state.weight_version, True
        return 200, vllm_completion_answer(top, g, prompt, v, body.get("model"), aborted)

    def vllm_pause(self, query):
        mode = (query.get("mode") or ["abort"])[0]
        if mode not in ("abort", "wait", "keep"):
            raise BadRequest(f"mode must be abort, wait or keep, got {mode!r}")
        self.server.state.pause(mode)
        return 200, {"status": "paused"}

    def vllm_resume(self, query):
        self.server.state.resume()
        return 200, {"status": "resumed"}

    def vllm_collective_rpc(self, query):
        body = self._body()
        if body.get("method") != "reload_weights":
            raise BadRequest(f"unsupported collective_rpc method {body.get('method')!r} "
                             "(this server implements reload_weights only)")
        path = (body.get("kwargs") or {}).get("weights_path")
        if not isinstance(path, str) or not path:
            raise BadRequest("reload_weights needs kwargs.weights_path")
        self.server.state.reload(path, None)
        return 200, {"results": [None]}

    def vllm_update_weight_version(self, query):
        version = _version_arg(self._body().get("new_version"))
        if version is None:
            raise BadRequest("new_version is required")
        self.server.state.set_version(version)
        return 200, {"success": True, "new_version": str(version)}

    # --- SGLang -------------------------------------------------------------------------------
    def sglang_generate(self, query):
        body = self._body()
        ids = body.get("input_ids")
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            raise BadRequest("batched input_ids are not supported: send one request per prompt")
        prompt = _token_ids(ids, "input_ids")
        sampling = _sampling(body.get("sampling_params") or {}, "max_new_tokens",
                             "sampling_seed", default_max=128)
        k = _input_logprobs_k(body)
        if k is None:
            g, v = self._generate(prompt, sampling)
            return 200, sglang_answer(g, v, len(prompt), bool(body.get("return_logprob")))
        try:
            top, g, v = self.server.state.score(prompt, k, sampling)
        except _Aborted:
            return 200, sglang_answer(None, self.server.state.weight_version, len(prompt), True)
        answer = sglang_answer(g, v, len(prompt), True)
        answer["meta_info"].update(sglang_input_logprobs(top, prompt, k))
        return 200, answer

    def sglang_pause(self, query):
        mode = self._body().get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"mode must be abort, retract or in_place, got {mode!r}")
        self.server.state.pause(_PAUSE_MODES[mode])
        return 200, {"message": "Generation paused."}

    def sglang_continue(self, query):
        self.server.state.resume()
        return 200, {"message": "Generation continued."}

    def sglang_update_from_disk(self, query):
        body = self._body()
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise BadRequest("model_path is required")
        version = _version_arg(body.get("weight_version"))
        try:
            new = self.server.state.reload(path, version)
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001 - SGLang answers 400 with success=false
            return 400, {"success": False, "message": f"{type(e).__name__}: {e}",
                         "num_paused_requests": 0}
        return 200, {"success": True, "message": f"loaded {path} as version {new}",
                     "num_paused_requests": 0}

    def sglang_init_group(self, query):
        from .weight_transfer import join_group

        b = self._body()
        try:
            name = str(b.get("group_name", "weight_update_group"))
            pg = join_group(backend=str(b.get("backend", "nccl")),
                            address=str(b["master_address"]), port=int(b["master_port"]),
                            rank=int(b["rank_offset"]), world_size=int(b["world_size"]),
                            group_name=name)
        except (KeyError, TypeError) as e:
            raise BadRequest(f"init_weights_update_group: {e}") from None
        except Exception as e:  # noqa: BLE001 - SGLang answers success=false
            return 400, {"success": False, "message": f"{type(e).__name__}: {e}"}
        self.server.state.groups[name] = pg
        return 200, {"success": True, "message": f"joined weight update group {name}"}

    def sglang_update_from_distributed(self, query):
        b = self._body()
        try:
            new = self.server.state.receive(
                str(b.get("group_name", "weight_update_group")), list(b["names"]),
                list(b["dtypes"]), list(b["shapes"]), _version_arg(b.get("weight_version")))
        except (KeyError, TypeError, AttributeError) as e:
            raise BadRequest(f"update_weights_from_distributed: {e}") from None
        message = "received" if new is None else f"loaded as version {new}"
        return 200, {"success": True, "message": message}

    def sglang_destroy_group(self, query):
        name = str(self._body().get("group_name", "weight_update_group"))
        pg = self.server.state.groups.pop(name, None)
        if pg is None:
            return 400, {"success": False, "message": f"no weight update group {name!r}"}
        return 200, {"success": True, "message": f"left weight update group {name}"}

    def server_info(self, query):
        return 200, {"tp_size": 1, "pp_size": 1, "dp_size": 1,
                     "weight_version": str(self.server.state.weight_version)}

    # --- shared -------------------------------------------------------------------------------
    def _generate(self, prompt, sampling):
        try:
            return self.server.state.generate(prompt, sampling)
        except _Aborted:
            return None, self.server.state.weight_version

    def health(self, query):
        return 200, {}

    def is_paused(self, query):
        return 200, {"is_paused": self.server.state.paused}

    def weight_info(self, query):
        return 200, {"weight_version": str(self.server.state.weight_version)}


_ROUTES = {
    ("GET", "/health"): _Handler.health,
    ("POST", "/inference/v1/generate"): _Handler.vllm_generate,
    ("POST", "/pause"): _Handler.vllm_pause,
    ("POST", "/resume"): _Handler.vllm_resume,
    ("GET", "/is_paused"): _Handler.is_paused,
    ("POST", "/collective_rpc"): _Handler.vllm_collective_rpc,
    ("POST", "/update_weight_version"): _Handler.vllm_update_weight_version,
    ("GET", "/weight_info"): _Handler.weight_info,
    ("POST", "/v1/completions"): _Handler.vllm_completions,
    ("POST", "/generate"): _Handler.sglang_generate,
    ("POST", "/pause_generation"): _Handler.sglang_pause,
    ("POST", "/continue_generation"): _Handler.sglang_continue,
    ("POST", "/update_weights_from_disk"): _Handler.sglang_update_from_disk,
    ("GET", "/model_info"): _Handler.weight_info,
    ("GET", "/get_server_info"): _Handler.server_info,
    ("POST", "/init_weights_update_group"): _Handler.sglang_init_group,
    ("POST", "/update_weights_from_distributed"): _Handler.sglang_update_from_distributed,
    ("POST", "/destroy_weights_update_group"): _Handler.sglang_destroy_group,
}


class EngineHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # closing does not wait for handlers still generating
    request_queue_size = 128

    def __init__(self, address, state: ServedEngine, *, verbose: bool = False):
        super().__init__(address, _Handler)
        self.state, self.verbose, self.routes = state, verbose, _ROUTES

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, *,
                reload: Callable[[str], Engine | None] | None = None,
                load_tensors: Callable[[dict], bool] | None = None,
                verbose: bool = False) -> EngineHTTPServer:
    """An HTTP server for ``engine`` (not yet serving: call ``serve_forever()``).

    ``reload(path)`` serves the disk updates; ``load_tensors(tensors)`` the distributed ones:
    given every HF-named tensor received so far, it loads them and returns True once they are a
    whole model (else False: more buckets are coming)."""
    return EngineHTTPServer((host, port), ServedEngine(engine, reload, load_tensors),
                            verbose=verbose)

