"""The dry-run report: layout, parameters and memory per rank against the GPU, without a GPU.

    python -m megatron_a1.train --config examples/configs/sft_35b_a3b.yaml --dry-run \\
        --world-size 32 --gpu-memory-gb 80 [--json]

:func:`build_report` returns one JSON-able dict (``memory_gib`` of the worst rank kind with its
``total``, ``gpu_memory_gib``, ``fits``, per-stage tables, derived DP / expert-DP, parameters per
rank, tokens and steps per epoch when the data is here); :func:`format_report` prints it as a
table. Memory comes from :func:`megatron_a1.training.memory.estimate`; when a rank kind does
not fit (or keeps under ``HEADROOM`` free), the report tries the usual remedies on the same
world size and lists those that fit.
"""
from __future__ import annotations

import copy
import math
import os

from megatron_a1.training.memory import GiB, estimate

HEADROOM = 0.10
"""Fraction of GPU memory a recipe should leave free (allocator fragmentation, NCCL buffers,
CUDA context, kernels' workspaces: none of which the model counts)."""

COMPONENTS = ("weights", "grads", "optimizer", "activations", "loss_head", "frozen_models",
              "transient")


def _gib(n: float) -> float:
    return round(n / GiB, 2)


def _data_info(cfg) -> dict | None:
    """Tokens, packed sequences and steps per epoch of ``data.prefixes``, when they are here."""
    prefixes = cfg.data.prefixes
    if not prefixes or not all(os.path.exists(p + ".idx") for p in prefixes):
        return None
    from megatron_a1.data.dataset import PackedDatasetConfig, build_packed_dataset

    ds = build_packed_dataset(PackedDatasetConfig(prefixes=prefixes, weights=cfg.data.weights,
                                                  max_seq_len=cfg.data.max_seq_len,
                                                  seed=cfg.data.seed))
    tokens = int(sum(int(d.store.lengths.sum()) for d in ds.datasets))
    packs = sum(len(d) for d in ds.datasets)
    steps = max(1, math.floor(packs * cfg.train.epochs / cfg.train.global_batch_size))
    return {"tokens": tokens, "packed_sequences": packs,
            "steps_per_epoch": max(1, packs // cfg.train.global_batch_size),
            "train_steps": cfg.train.train_steps if cfg.train.train_steps is not None else steps}


def _fits(est, gpu_bytes: float) -> bool:
    return est.peak.total <= gpu_bytes


def _variants(cfg, world_size: int):
    """Layout/recipe changes that lower memory, in the order one would try them."""
    p = cfg.parallel
    if cfg.model.recompute != "full":
        yield "model.recompute=full", lambda c: setattr(c.model, "recompute", "full")
    if cfg.train.stage == "sft" and not getattr(getattr(cfg, "sft", None), "fused_loss", True):
        yield "sft.fused_loss=true", lambda c: setattr(c.sft, "fused_loss", True)
    etp = p.expert_tensor_parallel or p.tensor_parallel
    if world_size % (etp * p.expert_parallel * 2 * p.pipeline_parallel) == 0:
        yield (f"parallel.expert_parallel={2 * p.expert_parallel}",
               lambda c: setattr(c.parallel, "expert_parallel", 2 * p.expert_parallel))
    # context parallelism is not suggested: the trainer refuses it (packs are not split over CP)
    if cfg.train.stage in ("sft",) and world_size % (
            p.tensor_parallel * p.pipeline_parallel * 2 * p.context_parallel) == 0:
        yield (f"parallel.pipeline_parallel={2 * p.pipeline_parallel}",
               lambda c: setattr(c.parallel, "pipeline_parallel", 2 * p.pipeline_parallel))
    if cfg.train.stage == "opd" and len(set(cfg.opd.teachers.values())) > 0:
        def serve(c):
            c.opd.teacher_servers = {d: f"http://teacher-{d}:8000" for d in c.opd.teachers}
            c.opd.teachers = {}
        yield "opd.teachers -> opd.teacher_servers (served teachers)", serve


def _suggest(cfg, world_size: int, gpu_bytes: float, device: str) -> list[dict]:
    """Single changes, then the first two together, that fit with the headroom."""
    tried = list(_variants(cfg, world_size))
    combos = [[t] for t in tried] + ([tried[:2]] if len(tried) > 1 else [])
    out = []
    for combo in combos:
        c = copy.deepcopy(cfg)
        for _, apply in combo:
            apply(c)
        try:
            est = estimate(c, world_size, device=device)
        except (ValueError, ZeroDivisionError):
            continue
        total = est.peak.total
        out.append({"change": " ".join(n for n, _ in combo), "total_gib": _gib(total),
                    "fits": total <= gpu_bytes * (1 - HEADROOM)})
    return out


def build_report(cfg, world_size: int, *, gpu_memory_gb: float = 80.0,
                 device: str | None = None) -> dict:
    """Everything the dry run says about ``cfg`` on ``world_size`` ranks (JSON-able).

    ``device``: whose kernels to model (see :func:`~megatron_a1.training.memory.estimate`);
    default ``"cuda"`` for a bf16 config or on a GPU machine, else ``"cpu"``.
    """
    from megatron_a1.training.model_setup import resolve_model_config

    if device is None:
        import torch

        device = "cuda" if cfg.model.bf16 or torch.cuda.is_available() else "cpu"
    mc = resolve_model_config(cfg.model)
    est = estimate(cfg, world_size, device=device)
    # a GPU's "80 GB" of HBM are binary: an H100 80GB has 80 GiB (nvidia-smi: 81,559 MiB)
    gpu = gpu_memory_gb * GiB
    p = cfg.parallel
    stages = {}
    for name, s in est.stages.items():
        stages[name] = {
            "params": s.params, "dense_params": s.dense_params, "expert_params": s.expert_params,
            "layers": s.layers, "peak_at": s.peak_at,
            "memory_gib": {**{k: _gib(v) for k, v in s.components.items()},
                           "total": _gib(s.total)},
            "fits": s.total <= gpu,
            "headroom": round(1 - s.total / gpu, 3),
        }
    worst_name = max(est.stages, key=lambda n: est.stages[n].total)
    worst = stages[worst_name]
    report = {
        "config": {"stage": cfg.train.stage, "preset": cfg.model.preset, "bf16": cfg.model.bf16,
                   "recompute": cfg.model.recompute, "max_seq_len": cfg.data.max_seq_len,
                   "micro_batch_size": cfg.train.micro_batch_size, "kernels": device},
        "world_size": world_size,
        "layout": {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                   "virtual_pipeline_parallel": p.virtual_pipeline_parallel,
                   "context_parallel": p.context_parallel, "expert_parallel": p.expert_parallel,
                   "expert_tensor_parallel": p.expert_tensor_parallel or p.tensor_parallel,
                   "sequence_parallel": p.sequence_parallel,
                   "data_parallel": est.data_parallel,
                   "expert_data_parallel": est.expert_data_parallel,
                   "distributed_optimizer": cfg.optim.distributed},
        "model_params": mc.num_parameters(),
        "active_params": mc.num_active_parameters(),
        "params_per_rank": est.params_per_rank,
        "micro_batches_per_step": est.micro_batches or None,
        "tokens_per_micro_batch": est.tokens_per_micro_batch,
        "data": _data_info(cfg),
        "stages": stages,
        "worst_stage": worst_name,
        "memory_gib": worst["memory_gib"],
        "gpu_memory_gib": gpu_memory_gb,
        "fits": worst["fits"],
        "headroom": worst["headroom"],
        "headroom_target": HEADROOM,
        "notes": est.notes,
    }
    if worst["headroom"] < HEADROOM:
        report["suggestions"] = _suggest(cfg, world_size, gpu, device)
    return report


def format_report(r: dict) -> str:
    """The report as a readable table."""
    lay = r["layout"]
    lines = [
        f"dry run: {r['config']['stage']} on {r['world_size']} ranks, preset "
        f"{r['config']['preset']} ({r['model_params'] / 1e9:.2f}B parameters, "
        f"{r['active_params'] / 1e9:.2f}B active), {r['config']['max_seq_len']:,} tokens per "
        f"pack, {'bf16' if r['config']['bf16'] else 'fp32'}, recompute "
        f"{r['config']['recompute']}, {r['config']['kernels']} kernels",
        f"layout: TP={lay['tensor_parallel']} PP={lay['pipeline_parallel']}"
        + (f" VPP={lay['virtual_pipeline_parallel']}" if lay["virtual_pipeline_parallel"] else "")
        + f" CP={lay['context_parallel']} EP={lay['expert_parallel']} "
        f"ETP={lay['expert_tensor_parallel']} SP={'on' if lay['sequence_parallel'] else 'off'}"
        f" -> DP={lay['data_parallel']}, expert-DP={lay['expert_data_parallel']}"
        f"{', distributed optimizer' if lay['distributed_optimizer'] else ''}",
    ]
    if r["micro_batches_per_step"]:
        lines.append(f"micro-batches per step per DP rank: {r['micro_batches_per_step']}")
    d = r["data"]
    if d:
        lines.append(f"data: {d['tokens']:,} tokens in {d['packed_sequences']:,} packed "
                     f"sequences -> {d['steps_per_epoch']:,} steps per epoch "
                     f"({d['train_steps']:,} steps this run)")
    names = list(r["stages"])
    head = f"{'GiB per rank':16s}" + "".join(f"{n + ' stage' if n != 'all' else 'every rank':>20s}"
                                             for n in names)
    lines += ["", head, "-" * len(head)]
    st = r["stages"]
    lines.append(f"{'parameters':16s}" + "".join(f"{st[n]['params'] / 1e9:>19.2f}B" for n in names))
    lines.append(f"{'  of experts':16s}"
                 + "".join(f"{st[n]['expert_params'] / 1e9:>19.2f}B" for n in names))
    for comp in COMPONENTS:
        if any(comp in st[n]["memory_gib"] for n in names):
            lines.append(f"{comp:16s}" + "".join(
                f"{st[n]['memory_gib'].get(comp, 0.0):>20.2f}" for n in names))
    lines.append("-" * len(head))
    lines.append(f"{'total':16s}" + "".join(f"{st[n]['memory_gib']['total']:>20.2f}"
                                             for n in names))
    lines.append(f"{'peak at':16s}" + "".join(f"{st[n]['peak_at']:>20s}" for n in names))
    gpu_gib = r["gpu_memory_gib"]
    lines.append(f"{'GPU memory':16s}" + "".join(f"{gpu_gib:>20.2f}" for _ in names))
    total = r["memory_gib"]["total"]
    if not r["fits"]:
        who = "every rank" if r["worst_stage"] == "all" else f"the {r['worst_stage']} stage"
        verdict = (f"DOES NOT FIT: {who} needs {total:.1f} GiB, "
                   f"{total - gpu_gib:.1f} GiB more than the GPU's {gpu_gib:.1f} GiB")
    elif r["headroom"] < r["headroom_target"]:
        verdict = (f"FITS, TIGHT: {total:.1f} of {gpu_gib:.1f} GiB ({r['headroom']:.0%} free, "
                   f"target {r['headroom_target']:.0%} for allocator and communication buffers)")
    else:
        verdict = f"FITS: {total:.1f} of {gpu_gib:.1f} GiB ({r['headroom']:.0%} free)"
    lines += ["", "verdict: " + verdict]
    for s in r.get("suggestions", []):
        mark = "fits" if s["fits"] else "still over"
        lines.append(f"  try {s['change']}: {s['total_gib']:.1f} GiB ({mark} with "
                     f"{r['headroom_target']:.0%} headroom)")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
