"""One small harness for every ``tools/bench_*.py``: timing, peak memory, a table, a CSV log.

    from megatron_a1.benchmarking import Bench
    bench = Bench("sva", smoke=args.smoke)
    bench.run("eager", case={"N": 4096}, fn=lambda: loss_fn(x), flops=..., bytes_moved=...)
    bench.report(csv_path=args.csv)   # prints the table, appends rows with device/versions/date

Timing uses CUDA events on a GPU and ``time.perf_counter`` on CPU, median of ``iters`` runs
after ``warmup``. Peak memory is the CUDA allocator's peak above the memory in use before the
call; on CPU (no allocator statistics) the peak of the tensor storages the call creates and
holds at once (:class:`~megatron_a1.storage_tracker.StorageTracker`, a separate untimed call),
never the process RSS.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_a1.storage_tracker import StorageTracker


def device_info() -> dict[str, str]:
    """What produced a figure: device name, torch/triton/CUDA versions, host."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "date": _dt.date.today().isoformat(),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_mb(fn: Callable[[], Any]) -> float | None:
    """Peak memory allocated by ``fn()`` above what was in use before it, in MiB: the CUDA
    allocator's on a GPU, :class:`StorageTracker`'s on CPU."""
    if not torch.cuda.is_available():
        with StorageTracker() as mem:
            fn()
        return mem.peak / 2**20
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Row:
    impl: str
    case: dict[str, Any]
    ms: float | None
    peak_mb: float | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Bench:
    """Collects rows for one benchmark, prints them as a table and appends them to a CSV."""

    def __init__(self, name: str, *, smoke: bool = False, warmup: int = 3, iters: int = 10):
        self.name = name
        self.smoke = smoke
        self.warmup, self.iters = (1, 2) if smoke else (warmup, iters)
        self.rows: list[Row] = []

    def run(
        self,
        impl: str,
        case: dict[str, Any],
        fn: Callable[[], Any],
        *,
        flops: float | None = None,
        bytes_moved: float | None = None,
    ) -> Row:
        """Time ``fn`` (and its peak memory); derive TFLOP/s and GB/s when given the counts.

        An implementation that fails (out of memory, unsupported shape) becomes a row with the
        error instead of aborting the whole table.
        """
        try:
            ms = time_ms(fn, self.warmup, self.iters)
            peak = peak_extra_mb(fn)
            metrics: dict[str, Any] = {}
            if flops is not None:
                metrics["TFLOP/s"] = flops / (ms * 1e-3) / 1e12
            if bytes_moved is not None:
                metrics["GB/s"] = bytes_moved / (ms * 1e-3) / 1e9
            row = Row(impl, case, ms, peak, metrics)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row = Row(impl, case, None, None, error=f"{type(exc).__name__}: {str(exc)[:80]}")
        self.rows.append(row)
        return row

    def table(self) -> str:
        case_keys = list(dict.fromkeys(k for r in self.rows for k in r.case))
        metric_keys = list(dict.fromkeys(k for r in self.rows for k in r.metrics))
        header = case_keys + ["impl", "ms", "peak MiB"] + metric_keys
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            cells = [str(r.case.get(k, "")) for k in case_keys] + [r.impl]
            cells.append(f"{r.ms:.3f}" if r.ms is not None else r.error or "n/a")
            cells.append(f"{r.peak_mb:.1f}" if r.peak_mb is not None else "n/a")
            cells += [_fmt(r.metrics.get(k)) for k in metric_keys]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def report(self, csv_path: str | None = None) -> str:
        """Print the table (with the device line) and append the rows to ``csv_path``."""
        info = device_info()
        mode = "smoke (CPU-sized shapes; not a performance figure)" if self.smoke else "full"
        text = (
            f"## {self.name} — {info['device']}, torch {info['torch']}, triton {info['triton']}, "
            f"{info['date']}, {mode}\n`{' '.join(sys.argv)}`\n\n{self.table()}"
        )
        print(text)
        if csv_path:
            new = not os.path.exists(csv_path)
            with open(csv_path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["bench", "impl", "case", "ms", "peak_mb", "metrics", "error",
                                "device", "torch", "triton", "date", "smoke"])
                for r in self.rows:
                    w.writerow([self.name, r.impl, r.case, r.ms, r.peak_mb, r.metrics, r.error,
                                info["device"], info["torch"], info["triton"], info["date"],
                                self.smoke])
        return text


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" if isinstance(v, float) else str(v)
