"""Sandbox start-up overhead per call: ours against a bare interpreter, same programs.

    python tools/bench_sandbox.py                  # median of 30 calls per row
    python tools/bench_sandbox.py --smoke          # 2 calls per row: proves the script runs
    python tools/bench_sandbox.py --iters 100 --csv bench.csv

Rows (wall milliseconds per call, as the caller sees it: start, run, teardown, result):

* ``python -I -c`` — ``subprocess.run`` of this interpreter with the program, no isolation:
  the floor any interpreter-per-call design pays;
* ``sandbox`` — :func:`megatron_a1.envs.sandbox.run_code` (new PID/net/IPC/UTS/cgroup/mount
  namespaces, private root, own uid, seccomp, tmpfs; everything torn down before it returns).

Programs: ``pass`` (pure start-up overhead) and ``import numpy`` (a typical tool call's start).
``CPU ms``: user + system CPU time of all the call's processes (median), which a busy host
inflates far less than wall time.
The rollout runs this thousands of times per RL step; the target is <= 50 ms for ``pass``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

from megatron_a1.benchmarking import Bench
from megatron_a1.envs.sandbox import Limits, run_code

PROGRAMS = {"pass": "pass", "import numpy": "import numpy"}
# what the sandbox gives its programs too (one BLAS/OpenMP thread)
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _bare(code: str) -> None:
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, cwd="/",
                         env=ENV)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-200:])


def _sandboxed(code: str) -> None:
    r = run_code(code, Limits(timeout_s=30))
    if r.reason != "ok":
        raise RuntimeError(f"{r.reason}: {r.stderr[-200:]}")


class _CpuClock:
    """CPU seconds (user + system) of the reaped child processes of each call: on a busy host
    wall time inflates with the queue for the cores, CPU time much less."""

    def __init__(self, fn):
        self.fn, self.samples = fn, []

    def __call__(self) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.fn()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.samples.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 calls per row (not a figure)")
    ap.add_argument("--iters", type=int, default=30, help="calls per row (median reported)")
    ap.add_argument("--csv", default=None, help="append the rows to this CSV")
    args = ap.parse_args(argv)
    bench = Bench("sandbox start-up per call", smoke=args.smoke, warmup=3, iters=args.iters)
    for name, code in PROGRAMS.items():
        case = {"program": name, "load": f"{os.getloadavg()[0]:.1f}"}
        for impl, fn in (("python -I -c (no isolation)", _bare),
                         ("sandbox (run_code)", _sandboxed)):
            clock = _CpuClock(lambda c=code, f=fn: f(c))
            row = bench.run(impl, case, clock)
            if clock.samples:
                row.metrics["CPU ms"] = clock.median_ms()
    bench.report(csv_path=args.csv)


if __name__ == "__main__":
    main()
