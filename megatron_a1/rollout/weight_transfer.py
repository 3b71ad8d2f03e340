"""Policy weights to an SGLang server over a collective, not through a shared disk.

SGLang's distributed update (``srt/entrypoints/http_server.py``; ``InitWeightsUpdateGroupReqInput``
and ``UpdateWeightsFromDistributedReqInput`` in ``srt/managers/io_struct.py``):

1. ``POST /init_weights_update_group {"master_address", "master_port", "rank_offset": 1,
   "world_size": 1 + server ranks, "group_name", "backend": "nccl"}`` — every server worker
   joins a process group with the sender as rank 0 (the call returns once the group is formed,
   so the sender joins while it is in flight).
2. Per bucket of tensors: ``POST /update_weights_from_distributed {"names", "dtypes", "shapes",
   "group_name", "flush_cache", "weight_version"?}`` while the sender broadcasts each tensor, in
   that order, from rank 0; the server loads them when the broadcasts are in. The last bucket
   carries ``weight_version`` and ``flush_cache: true``.
3. ``POST /destroy_weights_update_group {"group_name"}``.

The tensors are the HF-named ones of :func:`megatron_a1.model.convert.iter_hf_tensors`, streamed
one at a time from the step's ``dist_checkpointing`` checkpoint (the trainer writes it anyway to
resume): no HF export is written, and the server needs no access to the trainer's files. The
sender is a process of its own (``python -m megatron_a1.rollout.weight_transfer``; the converter
runs outside the training job's process groups), on the node of the trainer's rank 0; NCCL with a
GPU, gloo without one (the CPU tests, against ``tools/serve_embedded.py``, which implements the
receiving side of these routes).

The extra process group is built the way SGLang builds its side (a TCP-store rendezvous, the group
name as store prefix, ``torch.distributed``'s group constructor), so both ends agree on the
rendezvous keys of the same torch version.

vLLM's NCCL weight-transfer engine is not driven from here: its trainer side is vLLM's own
``vllm.distributed.weight_transfer`` package (``trainer_init``/``send_weights``), whose wire
format changed between releases; vLLM servers get weights through the disk path
(:mod:`megatron_a1.rollout.weight_sync`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import threading
import uuid

import torch

RANK_OFFSET = 1  # the sender is rank 0; server worker i is rank 1 + i


def join_group(*, backend: str, address: str, port: int, rank: int, world_size: int,
               group_name: str, timeout_s: float = 1800.0):
    """Join the weight-transfer process group (rank 0 hosts its TCP store at address:port)."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world, rendezvous)

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                      PrefixStore(group_name, store), group_name=group_name,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast(pg, tensor: torch.Tensor) -> None:
    """Broadcast ``tensor`` from group rank 0 (in place on the receivers)."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    pg.broadcast([tensor], opts).wait()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _buckets(tensors, bucket_bytes: int):
    """``(name, tensor)`` lists of about ``bucket_bytes`` each, with a flag on the last one."""
    bucket, size = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket, False  # ``t`` follows: not the last
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket, True


class _Call(threading.Thread):
    """An HTTP request running while this thread takes part in the collective."""

    def __init__(self, client, path: str, body: dict):
        super().__init__(daemon=True)
        self.client, self.path, self.body = client, path, body
        self.answer, self.error = None, None
        self.start()

    def run(self):
        try:
            self.answer = self.client.request("POST", self.path, self.body)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        if isinstance(self.answer, dict) and self.answer.get("success") is False:
            raise RuntimeError(f"{self.path}: {self.answer.get('message')}")
        return self.answer


def server_ranks(client) -> int:
    """Worker processes of an SGLang server: tensor x pipeline parallel (``/get_server_info``)."""
    info = client.request("GET", "/get_server_info")
    return int(info.get("tp_size", 1)) * int(info.get("pp_size", 1))


def push_checkpoint(checkpoint: str, url: str, *, version: int, hf_config: dict | None = None,
                    address: str | None = None, ranks: int | None = None,
                    bucket_bytes: int = 512 * 2**20, timeout_s: float = 1800.0) -> int:
    """Broadcast the weights of ``checkpoint`` to the SGLang server at ``url`` as ``version``;
    returns the number of tensors sent. Runs in a process without other process groups."""
    from megatron_a1.model.convert import iter_hf_tensors
    from megatron_a1.rollout.http import HTTPClient
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.runtime.parallel import free_port

    client = HTTPClient(url, timeout_s=timeout_s, max_retries=0)
    ranks = ranks or server_ranks(client)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    address = address or socket.gethostbyname(socket.gethostname())
    port, group = free_port(), f"megatron_a1_weights_{version}_{uuid.uuid4().hex[:8]}"
    backend = "nccl" if cuda else "gloo"
    # the converter reads the checkpoint as a one-rank job of its own, whatever job launched us
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    initialize(seed=0)
    try:
        call = _Call(client, "/init_weights_update_group", {
            "master_address": address, "master_port": port, "rank_offset": RANK_OFFSET,
            "world_size": 1 + ranks, "group_name": group, "backend": backend})
        pg = join_group(backend=backend, address=address, port=port, rank=0,
                        world_size=1 + ranks, group_name=group, timeout_s=timeout_s)
        call.result()
        _, _, tensors = iter_hf_tensors(checkpoint, hf_config=hf_config)
        sent = 0
        try:
            for bucket, last in _buckets(tensors, bucket_bytes):
                body = {"names": [n for n, _ in bucket],
                        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket], "group_name": group,
                        "flush_cache": last, "abort_all_requests": False}
                if last:
                    body["weight_version"] = str(version)
                call = _Call(client, "/update_weights_from_distributed", body)
                for _, t in bucket:
                    broadcast(pg, t.to(device).contiguous())
                call.result()
                sent += len(bucket)
        finally:
            client.request("POST", "/destroy_weights_update_group", {"group_name": group})
        return sent
    finally:
        destroy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m megatron_a1.rollout.weight_transfer",
        description="Broadcast a training checkpoint's weights to an SGLang server "
                    "(update_weights_from_distributed; NCCL on a GPU, gloo on CPU).")
    ap.add_argument("--checkpoint", required=True, help="dist_checkpointing directory (iter_N)")
    ap.add_argument("--url", required=True, help="SGLang server base URL")
    ap.add_argument("--version", type=int, required=True, help="weight version to report")
    arch = ap.add_mutually_exclusive_group()
    arch.add_argument("--hf-config", help="config.json of the architecture (default: the "
                      "checkpoint's hf_conversion.json)")
    arch.add_argument("--hf-config-json", help="the same, inline")
    ap.add_argument("--address", help="this host's address as the server reaches it (default: "
                    "the address of its hostname)")
    ap.add_argument("--server-ranks", type=int, help="server worker processes (default: "
                    "tp_size x pp_size from /get_server_info)")
    ap.add_argument("--bucket-mb", type=float, default=512, help="tensors per update request")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    args = ap.parse_args(argv)
    hf_config = json.loads(args.hf_config_json) if args.hf_config_json else None
    if args.hf_config:
        with open(args.hf_config) as f:
            hf_config = json.load(f)
    n = push_checkpoint(args.checkpoint, args.url, version=args.version, hf_config=hf_config,
                        address=args.address, ranks=args.server_ranks,
                        bucket_bytes=int(args.bucket_mb * 2**20), timeout_s=args.timeout_s)
    print(f"sent {n} tensors of {args.checkpoint} to {args.url} as version {args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
