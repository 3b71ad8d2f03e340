"""Point a running vLLM or SGLang server at new policy weights, and tag them with a version.

The trainer writes the new weights as a Hugging Face safetensors directory
(:func:`megatron_a1.model.convert.megatron_to_hf`, or ``tools/convert_checkpoint.py mcore-to-hf``:
from the step's checkpoint under any TP/EP/PP layout, files world-readable so a server running
as another user reads them) on a file system every inference worker sees, then calls
:meth:`update_from_disk` with the directory's absolute path. On success the client's :attr:`HTTPEngine.weight_version` becomes the
new version, which tags every later generation (see :mod:`megatron_a1.rollout.http`).

**vLLM** (the RL control routes are mounted only with ``VLLM_SERVER_DEV_MODE=1``;
``vllm/entrypoints/serve/dev/rlhf/api_router.py`` and ``.../dev/rpc/api_router.py``):

1. ``POST /pause?mode=wait`` — let in-flight requests finish (``abort``: abort them, they answer
   ``finish_reason: "abort"`` and :class:`HTTPEngine` re-sends them; ``keep``: freeze them).
   New generate requests wait until ``/resume``. The prefix cache is cleared (``clear_cache``,
   default true), so nothing computed with the old weights is reused.
2. ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`` — every
   worker reloads its shard from ``DIR`` in place, layer by layer (vLLM's layerwise reload,
   docs ``training/layerwise``); answers ``{"results": [...]}``.
3. ``POST /update_weight_version {"new_version": "N"}`` — what ``GET /weight_info`` reports.
4. ``POST /resume``.

The client's version is set as soon as step 1 returns (requests sent from then on are served by
the new weights); if step 2 or 3 fails it is put back and the server is left paused (partially
loaded weights must not be served): call :meth:`update_from_disk` again, or :meth:`resume`.

**SGLang** (``srt/entrypoints/http_server.py``, ``UpdateWeightFromDiskReqInput`` in
``srt/managers/io_struct.py``): one call,
``POST /update_weights_from_disk {"model_path": DIR, "weight_version": "N", "abort_all_requests":
false, "flush_cache": true}`` → ``{"success", "message", "num_paused_requests"}`` (400 on
failure). SGLang holds new requests and lets running ones finish (``abort_all_requests=true``
aborts them instead); generations then report ``meta_info.weight_version == "N"``. Pause and
resume are ``POST /pause_generation {"mode": "abort" | "retract" | "in_place"}`` and
``POST /continue_generation``.

**Over NCCL instead of the disk.** Writing 70 GB of bf16 weights per step is slow; on a cluster
the trainer can broadcast them:

* SGLang: :mod:`megatron_a1.rollout.weight_transfer` (``rollout.weight_transfer:
  distributed``) — ``/init_weights_update_group``, then ``/update_weights_from_distributed``
  per bucket while rank 0 broadcasts the HF-named tensors streamed from the step's checkpoint.
* vLLM (not wired in here): start the server with ``--weight-transfer-config '{"backend":
  "nccl"}'``; once, ``POST /init_weight_transfer_engine`` while the trainer's rank 0 joins the
  group; each update ``/pause`` → ``/start_weight_update`` → ``/update_weights`` concurrently with
  the broadcasts → ``/finish_weight_update`` → ``/resume``. The trainer side of that is vLLM's own
  ``vllm.distributed.weight_transfer`` package (``trainer_init``/``send_weights``), whose wire
  format has changed between releases, so it needs vLLM in the training image; until then vLLM
  servers take the disk path above.
"""
from __future__ import annotations

import os

from .http import HTTPEngine

VLLM_PAUSE_MODES = ("abort", "wait", "keep")
SGLANG_PAUSE_MODES = ("abort", "retract", "in_place")


class WeightSync:
    """Weight updates, pause and resume for the server behind ``engine``.

    ``timeout_s`` bounds each control request (loading 35B parameters from disk takes minutes);
    connection errors and 5xx are retried with the engine's retry policy.
    """

    def __init__(self, engine: HTTPEngine, *, timeout_s: float = 1800.0):
        self.engine, self.timeout_s = engine, timeout_s

    def _post(self, path: str, body=None):
        return self.engine.client.request("POST", path, body, timeout_s=self.timeout_s)

    def pause(self, mode: str | None = None) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def update_from_disk(self, path: str, version: int | None = None) -> int:
        """Load the HF checkpoint in ``path``; returns the new version (default: current + 1)."""
        raise NotImplementedError

    def _check_path(self, path: str) -> str:
        if not os.path.isabs(path):
            raise ValueError(f"weights path must be absolute (the server resolves it): {path!r}")
        return path


class VLLMWeightSync(WeightSync):
    """vLLM's RL routes (server started with ``VLLM_SERVER_DEV_MODE=1``)."""

    def pause(self, mode: str | None = "wait") -> None:
        mode = mode or "wait"
        if mode not in VLLM_PAUSE_MODES:
            raise ValueError(f"vLLM pause mode must be one of {VLLM_PAUSE_MODES}, got {mode!r}")
        self._post(f"/pause?mode={mode}")

    def resume(self) -> None:
        self._post("/resume")

    def update_from_disk(self, path: str, version: int | None = None, *,
                         pause_mode: str = "wait") -> int:
        path = self._check_path(path)
        old = self.engine.weight_version
        new = old + 1 if version is None else int(version)
        self.pause(pause_mode)
        self.engine.weight_version = new
        try:
            self._post("/collective_rpc", {"method": "reload_weights",
                                           "kwargs": {"weights_path": path}})
            self._post("/update_weight_version", {"new_version": str(new)})
        except BaseException:
            self.engine.weight_version = old  # the server stays paused: see the module docstring
            raise
        self.resume()
        return new


class SGLangWeightSync(WeightSync):
    """SGLang's ``update_weights_from_disk`` and pause/continue routes."""

    def pause(self, mode: str | None = "abort") -> None:
        mode = mode or "abort"
        if mode not in SGLANG_PAUSE_MODES:
            raise ValueError(f"SGLang pause mode must be one of {SGLANG_PAUSE_MODES}, got {mode!r}")
        self._post("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self._post("/continue_generation", {})

    def update_from_disk(self, path: str, version: int | None = None, *,
                         abort_all_requests: bool = False) -> int:
        path = self._check_path(path)
        new = self.engine.weight_version + 1 if version is None else int(version)
        answer = self._post("/update_weights_from_disk", {
            "model_path": path, "weight_version": str(new),
            "abort_all_requests": abort_all_requests, "flush_cache": True})
        if isinstance(answer, dict) and answer.get("success") is False:  # 200 with success=false
            raise RuntimeError(f"SGLang update_weights_from_disk failed: {answer.get('message')}")
        self.engine.weight_version = new
        return new


def weight_sync_for(engine: HTTPEngine, **kwargs) -> WeightSync:
    """The weight-sync client for ``engine``'s backend."""
    return (VLLMWeightSync if engine.backend == "vllm" else SGLangWeightSync)(engine, **kwargs)
