"""Resource and roofline report of every Triton kernel configuration, compiled for real GPUs.

    python tools/kernel_report.py --arch all --json kernel_report.json   # every config, 3 archs
    python tools/kernel_report.py --arch sm_90 --quick                   # bf16 / k=64 / tp=1 only
    python tools/kernel_report.py --traffic-only                         # interpreter traffic only

For each (kernel, config, arch) of every family's ``launch_specs()`` (``a1_kernels.aot_common
.FAMILIES``) it compiles with Triton's real compiler in parallel worker processes (never under
``TRITON_INTERPRET``; results cached on disk, see ``aot_common.cache_dir()``), reads registers,
spills, shared memory, tensor-core instructions and the main loop's SASS (instructions per
iteration and per kFLOP of MMA, MMA shapes, cp.async/TMA/plain loads; ``aot_common.main_loop``)
with ``cuobjdump``, and prints one Markdown
row with the theoretical occupancy and the roofline time of one launch at the 35B-A3B shape.
Then it counts, under the interpreter on small shapes, the bytes each kernel moves against the
minimum the maths needs (``a1_kernels.traffic``). Exit status 1 if any compile failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from a1_kernels import aot_common as aot

ARCH_CHOICES = {"sm_80": [80], "sm_90": [90], "sm_100": [100], "all": [80, 90, 100]}


def _quick(spec: dict) -> bool:
    """The model's own launches: bf16 attention at head dims 128/256, SVA at k=64 and tp=1."""
    shape = spec["shape"]
    if spec["kernel"].startswith("attention"):
        return shape["dtype"] == "bf16" and shape["head_dim"] in (128, 256)
    if spec["kernel"].startswith("_ce_"):  # fused cross-entropy: bf16 logits, one rank's vocab
        return shape["dtype"] == "bf16" and shape["tp"] == 1
    return shape.get("k") == 64 and shape.get("tp", 1) == 1 and shape.get("dtype") in ("bf16", "fp32")


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _loop_cells(r: dict) -> str:
    """Main-loop cells: instructions per iteration (per warp), per kFLOP of MMA, MMA shapes,
    cp.async / TMA / plain global loads per iteration."""
    loop = r.get("main_loop") if r["compiled"] else None
    if not loop:
        return "- | - | - | - "
    shapes = " ".join(f"{n}×{k.split('.', 1)[1]}" for k, n in sorted(loop["mma_shapes"].items()))
    return (f"{loop['instructions']} | {loop['insts_per_kflop']:.2f} | {shapes} | "
            f"{loop['ldgsts']}/{loop['utmaldg']}/{loop['ldg']}")


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | config | arch | ok | regs | spill B | smem B | occ | TC | loop insts | "
            "insts/kFLOP | loop MMAs | LDGSTS/TMA/LDG | GFLOP | MB | roofline µs | bound |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = "yes" if r["compiled"] else "**FAIL**"
        tc = ",".join(r["tensor_core_ops"] or []) or "-" if r["compiled"] else "-"
        occ = f"{r['occupancy']:.2f} ({r['occupancy_limiter'][:4]})" if r["compiled"] else "-"
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['arch']} | {ok} | {r['registers'] or '-'} | "
            f"{r['spill_bytes'] if r['compiled'] else '-'} | {r['shared_bytes'] if r['compiled'] else '-'} | "
            f"{occ} | {tc} | {_loop_cells(r)} | {r['flops'] / 1e9:.1f} | {_fmt_bytes(r['min_bytes'])} | "
            f"{r['roofline_us']:.1f} | {r['bound']} |")
    return "\n".join(lines)


def traffic_rows() -> list[dict]:
    """Run ``a1_kernels.traffic`` under the interpreter in a child process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "a1_kernels.traffic"], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"traffic measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def traffic_markdown(rows: list[dict]) -> str:
    lines = ["| kernel | small shape | bytes moved | minimum | ratio | goal | met | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['bytes']:,} | {r['min_bytes']:,} | "
                     f"{r['ratio']:.3f} | {r['goal']} | {'yes' if r['met'] else '**no**'} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCH_CHOICES), default="all")
    p.add_argument("--json", help="write every row (and the traffic rows) here")
    p.add_argument("--quick", action="store_true", help="the model's launches only")
    p.add_argument("--family", choices=sorted(aot.FAMILIES), action="append",
                   help="only this family (repeatable); default all")
    p.add_argument("--workers", type=int, default=aot.default_workers())
    p.add_argument("--no-cache", action="store_true", help="recompile, ignoring the disk cache")
    p.add_argument("--no-traffic", action="store_true", help="skip the interpreter traffic count")
    p.add_argument("--traffic-only", action="store_true")
    args = p.parse_args(argv)

    import triton

    started = time.time()
    rows, jobs, specs = [], [], {}
    if not args.traffic_only:
        for fam in args.family or sorted(aot.FAMILIES):
            specs[fam] = aot.load_specs(fam)
            for i, spec in enumerate(specs[fam]):
                if args.quick and not _quick(spec):
                    continue
                # A tile listed for some GPUs only (attention's sm_90 tiles) is compiled for them.
                jobs += [(fam, i, arch) for arch in ARCH_CHOICES[args.arch]
                         if arch in spec.get("archs", ARCH_CHOICES["all"])]

        def progress(done, total, row):
            status = "ok" if row.get("compiled") else "FAILED"
            print(f"[{done}/{total}] {row['kernel']} {row['config']} sm_{row['arch']} {status} "
                  f"{row.get('compile_s', '-')} s{' (cached)' if row.get('cached') else ''}",
                  file=sys.stderr, flush=True)

        results = aot.compile_rows(jobs, workers=args.workers, use_cache=not args.no_cache,
                                   progress=progress)
        rows = [aot.report_row(specs[r["family"]][r["index"]], r) for r in results]
        rows.sort(key=lambda r: (r["arch"], r["kernel"]))
    traffic = [] if args.no_traffic else traffic_rows()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# Kernel report ({stamp}, Triton {triton.__version__}, "
          f"`python tools/kernel_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`)\n")
    for arch in ARCH_CHOICES[args.arch] if rows else []:
        sub = [r for r in rows if r["arch"] == f"sm_{arch}"]
        gpu = aot.GPUS[aot.ARCHS[arch].gpu]
        print(f"## sm_{arch} ({gpu.name}: peaks from {gpu.source})\n")
        print(markdown(sub) + "\n")
    if traffic:
        print("## Memory traffic under the interpreter (small shapes)\n")
        print(traffic_markdown(traffic) + "\n")
    failed = [r for r in rows if not r["compiled"]]
    print(f"{len(rows)} rows, {len(failed)} failed to compile, "
          f"{sum(1 for r in rows if r['compiled'] and r['spill_bytes'])} spill; "
          f"{time.time() - started:.0f} s", flush=True)
    for r in failed:
        print(f"FAILED {r['kernel']} [{r['config']}] {r['arch']}: {r['error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton_version": triton.__version__, "date": stamp, "rows": rows,
                       "traffic": traffic, "gpus": {k: g._asdict() for k, g in aot.GPUS.items()}},
                      f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
