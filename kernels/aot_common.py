"""Ahead-of-time compilation of the Triton kernels for real GPUs, with no GPU present.

One place for what ``tools/kernel_report.py`` and the compile tests share:

* ``compile_spec(spec, arch)``: Triton's real compiler (never the interpreter) for ``sm_<arch>``.
* ``launch_specialization(fn, values)``: the signature, constants and alignment hints Triton's
  launcher derives from real arguments, so that a spec compiles what a launch would run.
* ``inspect_cubin(cubin)``: registers, spill (stack/local) bytes, static shared memory and the
  tensor-core instructions, read with the ``cuobjdump`` shipped in the Triton wheel. It raises
  when the output cannot be parsed, so no check downstream passes on numbers it never read.
* ``occupancy(arch, registers, shared_bytes, num_warps)``: theoretical occupancy from the
  architecture's register file, shared memory, warp and block limits (``ARCHS``).
* ``GPUS`` / ``roofline_us``: peak FLOP/s and HBM bandwidth of A100/H100/B200, each with its source.
* ``compile_rows(jobs)``: compiles (family, spec index, arch) jobs in parallel worker processes
  started without ``TRITON_INTERPRET`` and caches each result on disk, keyed by the kernel's
  source hash (``JITFunction.cache_key``, which covers the functions it calls), the compile
  inputs, the arch and the Triton version.
* ``count_traffic(tensors)``: under ``TRITON_INTERPRET=1``, the bytes every ``tl.load``/``tl.store``
  moves, per named tensor and per program.

A *spec* is a dict from a family's ``aot.launch_specs()`` (``FAMILIES``): ``kernel``, ``fn``,
``signature``, ``constexprs``, optional ``attrs``, ``num_warps``, ``num_stages``, ``config``
(text) and ``shape`` (model shape plus ``flops``/``min_bytes`` of one launch, ``dtype``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable, NamedTuple

# Every family of Triton kernels in this package: name -> module with ``launch_specs()``.
FAMILIES = {"attention": "a1_kernels.attention.aot", "sva": "a1_kernels.sva.aot",
            "cross_entropy": "a1_kernels.cross_entropy.aot"}


# ------------------------------------------------------------------------------------------------
# Architectures and GPUs
# ------------------------------------------------------------------------------------------------
class Arch(NamedTuple):
    """Per-SM limits of one compute capability (CUDA C++ Programming Guide, "Technical
    Specifications per Compute Capability", and the CUDA Occupancy Calculator's granularities)."""

    gpu: str  # the GPU of ``GPUS`` this arch is reported against
    regs_per_sm: int
    max_regs_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # bytes usable by blocks on one SM
    smem_per_block: int  # maximum (opt-in) shared memory of one block
    smem_reserved_per_block: int  # the driver's per-block reservation (1 KB since sm_80)
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_alloc_unit: int = 128


ARCHS: dict[int, Arch] = {
    80: Arch("A100", 65536, 255, 64, 32, 164 * 1024, 163 * 1024, 1024),
    90: Arch("H100", 65536, 255, 64, 32, 228 * 1024, 227 * 1024, 1024),
    100: Arch("B200", 65536, 255, 64, 32, 228 * 1024, 227 * 1024, 1024),
}


class GPU(NamedTuple):
    """Dense (no sparsity) peaks in FLOP/s and HBM bandwidth in bytes/s."""

    name: str
    bf16: float  # bf16/fp16 tensor cores, fp32 accumulate
    tf32: float  # tf32 tensor cores
    fp32: float  # CUDA cores, no tensor cores
    hbm: float
    source: str


GPUS: dict[str, GPU] = {
    "A100": GPU("A100-SXM4-80GB", 312e12, 156e12, 19.5e12, 2.039e12,
                "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS, TF32 156, "
                "FP32 19.5, HBM2e 2,039 GB/s"),
    "H100": GPU("H100-SXM5-80GB", 989.4e12, 494.7e12, 66.9e12, 3.35e12,
                "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity "
                "(989.4 dense), TF32 989 sparse (494.7 dense), FP32 67, HBM3 3.35 TB/s"),
    "B200": GPU("B200 (HGX B200)", 2.25e15, 1.125e15, 75e12, 8.0e12,
                "NVIDIA HGX B200 datasheet (8 GPUs, with sparsity): FP16/BF16 36 PFLOPS, TF32 18 "
                "PFLOPS, FP32 600 TFLOPS, 64 TB/s -> per GPU dense 2.25 PF, 1.125 PF, 75 TF, 8 TB/s"),
}
# Which peak a launch runs against, by the ``math`` of its spec's shape: bf16/fp16 tl.dot, fp32
# inputs through tf32x3 (three tf32 tensor-core products), or plain CUDA-core fp32.
_PEAK = {"bf16": lambda g: g.bf16, "fp16": lambda g: g.bf16, "tf32x3": lambda g: g.tf32 / 3,
         "fp32": lambda g: g.fp32}


def roofline_us(arch: int, flops: float, min_bytes: float, math_kind: str) -> float:
    """The fewest microseconds one launch can take on ``ARCHS[arch].gpu``: max(compute, memory)."""
    gpu = GPUS[ARCHS[arch].gpu]
    compute = flops / _PEAK[math_kind](gpu) if flops else 0.0
    return 1e6 * max(compute, min_bytes / gpu.hbm)


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> dict:
    """Theoretical occupancy of one kernel: resident blocks and warps per SM, and the limiter."""
    a = ARCHS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / a.reg_alloc_unit) * a.reg_alloc_unit
    limits = {
        "warps": a.max_warps_per_sm // num_warps,
        "blocks": a.max_blocks_per_sm,
        "registers": (a.regs_per_sm // regs_per_warp) // num_warps,
    }
    smem = math.ceil(shared_bytes / a.smem_alloc_unit) * a.smem_alloc_unit + a.smem_reserved_per_block
    limits["shared"] = a.smem_per_sm // smem
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / a.max_warps_per_sm, "limiter": limiter}


# ------------------------------------------------------------------------------------------------
# Compile and inspect
# ------------------------------------------------------------------------------------------------
def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_spec(spec: dict, arch: int):
    """Compile one spec for ``sm_<arch>`` with no GPU; returns Triton's ``CompiledKernel``.

    Uses only ``triton.compile``/``ASTSource``/``GPUTarget``, which Triton 3.3+ (pip 3.7 here, the
    NGC image's 3.x) all have. Must run without ``TRITON_INTERPRET`` (the kernels would be
    interpreter functions)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kwargs = {"attrs": spec["attrs"]} if spec.get("attrs") else {}
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"],
                                    constexprs=spec["constexprs"], **kwargs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})


def launch_specialization(fn, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource`` exactly as Triton's launcher derives them
    from real arguments (``native_specialize_impl``, the launcher's own routine): 16-byte
    aligned tensors and integers divisible by 16 get ``tt.divisibility = 16``, an integer equal
    to 1 becomes a constant. ``values``: every argument of ``fn`` by name (tensors may be empty
    ones of the right dtype: their data pointer is 0, i.e. aligned, as the caching allocator's
    are)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    missing = set(fn.arg_names) - set(values)
    if missing:
        raise KeyError(f"no value for argument(s) {sorted(missing)} of {fn.arg_names}")
    # From the Python function's annotations: works for a JITFunction and, when this process
    # interprets, for the InterpretedFunction that stands in for it.
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    no_specialize = set(getattr(fn, "do_not_specialize", ()))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if "constexpr" in str(params[name].annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False,
                                            i not in no_specialize, True)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = kind
            if isinstance(spec, str) and BaseBackend.parse_attr(spec):
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


# Tensor-core instructions in SASS: mma.sync (HMMA, IMMA), Hopper's warpgroup MMA (HGMMA and the
# fp8/int8 QGMMA/IGMMA), Blackwell's tcgen05 (UTCHMMA, UTCQMMA, ...).
_TC_OPS = re.compile(r"\b(HMMA|IMMA|HGMMA|QGMMA|IGMMA|UTC[A-Z]*MMA)\b")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def inspect_cubin(cubin: bytes) -> dict:
    """cuobjdump's view of a cubin: registers, stack/local (spill) and static shared bytes, and
    the tensor-core opcodes in its SASS. Raises ``RuntimeError`` if ``-res-usage`` has no line to
    parse (a silent miss would make the no-spill check vacuous)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    return dict(parse_res_usage(res), tensor_core_ops=tensor_core_ops(sass),
                sass_lines=sass.count("\n"), main_loop=main_loop(sass),
                async_loads=async_load_counts(sass))


def parse_res_usage(text: str) -> dict:
    """Registers, stack and local bytes (spills: ptxas puts spilled registers in the stack frame),
    static shared bytes from ``cuobjdump -res-usage`` of a one-kernel cubin. Raises
    ``RuntimeError`` when there is no line to parse or it reports no registers."""
    found = _RES.findall(text)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel in `cuobjdump -res-usage`, parsed {len(found)}:\n{text}")
    regs, stack, static_shared, local = map(int, found[0])
    if regs <= 0:
        raise RuntimeError(f"`cuobjdump -res-usage` reports {regs} registers:\n{text}")
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "spill_bytes": stack + local, "static_shared": static_shared}


def tensor_core_ops(sass: str) -> list[str]:
    """The tensor-core opcodes present in ``cuobjdump -sass`` output."""
    return sorted(set(_TC_OPS.findall(sass)))


# One SASS instruction: "/*0a10*/   @!P0 BRA 0x1d0 ;" -> address, text (predicate included).
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:`?\(?\.?L?_?x?_?)?0x([0-9a-f]+)")
_HGMMA = re.compile(r"\b[HQI]GMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\b[HI]MMA\.(16)(8)(\d+)")
# Global loads by kind: cp.async (LDGSTS, sm_80+), TMA (UTMALDG, sm_90+), plain (LDG).
_LOAD_KINDS = {"ldgsts": re.compile(r"\bLDGSTS\b"), "utmaldg": re.compile(r"\bUTMALDG\b"),
               "ldg": re.compile(r"\bLDG\b"), "atomics": re.compile(r"\b(?:REDG?|ATOMG?)\b")}


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(a, 16), text.strip()) for a, text in _INSN.findall(sass)]


def _mma_flops_per_warp(text: str) -> int:
    """FLOPs one warp's issue of a tensor-core instruction performs (a warpgroup MMA of shape
    m x n x k is issued by its 4 warps; mma.sync m16n8k is one warp's)."""
    g = _HGMMA.search(text)
    if g:
        m, n, k = map(int, g.groups())
        return 2 * m * n * k // 4
    h = _HMMA.search(text)
    if h:
        m, n, k = map(int, h.groups())
        return 2 * m * n * k
    return 0


def main_loop(sass: str) -> dict | None:
    """The hot loop of a kernel's SASS, per iteration and per warp: the innermost backward-branch
    loop with the most tensor-core FLOPs (the fewest instructions among equals, i.e. the unmasked
    one of a masked/unmasked pair). ``instructions``, ``mma_flops`` (per warp), ``insts_per_kflop``,
    the MMA shapes (``HGMMA.64x64x16`` ...) with counts, warpgroup waits, and global loads by kind.
    None when no loop holds an MMA."""
    insts = _instructions(sass)
    addrs = [a for a, _ in insts]
    loops = []
    for a, text in insts:
        b = _BRA.search(text)
        if b and int(b.group(1), 16) <= a:
            lo = addrs.index(int(b.group(1), 16)) if int(b.group(1), 16) in addrs else None
            if lo is not None:
                loops.append((lo, addrs.index(a)))
    loops = [(lo, hi) for lo, hi in loops
             if any(_mma_flops_per_warp(t) for _, t in insts[lo:hi + 1])]
    inner = [(lo, hi) for lo, hi in loops
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    if not inner:
        return None

    def stats(lo, hi):
        body = [t for _, t in insts[lo:hi + 1]]
        shapes: dict[str, int] = {}
        for t in body:
            m = _HGMMA.search(t) or _HMMA.search(t)
            if m:
                op = m.group(0).split(".")[0]
                key = f"{op}.{'x'.join(m.groups())}" if op.endswith("GMMA") else m.group(0)
                shapes[key] = shapes.get(key, 0) + 1
        flops = sum(_mma_flops_per_warp(t) for t in body)
        row = {"instructions": len(body), "mma_flops": flops,
               "insts_per_kflop": round(1000 * len(body) / flops, 3), "mma_shapes": shapes,
               "warpgroup_waits": sum("WARPGROUP.DEPBAR" in t for t in body)}
        row.update({k: sum(bool(r.search(t)) for t in body) for k, r in _LOAD_KINDS.items()})
        return row

    rows = [stats(lo, hi) for lo, hi in inner]
    return max(rows, key=lambda r: (r["mma_flops"], -r["instructions"]))


def async_load_counts(sass: str) -> dict:
    """Global-load instructions of the whole kernel by kind (see ``_LOAD_KINDS``)."""
    texts = [t for _, t in _instructions(sass)]
    return {k: sum(bool(r.search(t)) for t in texts) for k, r in _LOAD_KINDS.items()}


def cache_dir() -> str:
    return os.environ.get("A1_AOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "a1_kernels", "aot")


def _spec_key_data(spec: dict, arch: int) -> dict:
    return {"kernel": spec["kernel"], "signature": spec["signature"],
            "constexprs": spec["constexprs"], "attrs": repr(spec.get("attrs")),
            "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "arch": arch}


def compile_key(spec: dict, arch: int) -> str:
    """Identifies one compilation within a process (specs differing only by runtime shape share it)."""
    return json.dumps(_spec_key_data(spec, arch), sort_keys=True, default=str)


def compile_and_inspect(spec: dict, arch: int, use_cache: bool = True) -> dict:
    """Compile + cuobjdump one spec (in this process, which must not be interpreting), cached."""
    import triton

    key = hashlib.sha256(json.dumps(
        [spec["fn"].cache_key, _spec_key_data(spec, arch), triton.__version__],
        sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(cache_dir(), key[:2], key + ".json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    t0 = time.perf_counter()
    row = {"triton_version": triton.__version__, "source_hash": spec["fn"].cache_key[:16]}
    try:
        kernel = compile_spec(spec, arch)
        row.update(inspect_cubin(kernel.asm["cubin"]))
        row["dynamic_shared"] = int(kernel.metadata.shared)
        row["shared_bytes"] = row["static_shared"] + row["dynamic_shared"]
        row["compiled"], row["error"] = True, None
    except Exception as exc:  # reported with the kernel/config; the compiler's message kept whole
        row["compiled"], row["error"] = False, f"{type(exc).__name__}: {exc}"[-4000:]
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    if use_cache and row["compiled"]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(row, f)
        os.replace(tmp, path)
    return dict(row, cached=False)


# ------------------------------------------------------------------------------------------------
# Parallel workers
# ------------------------------------------------------------------------------------------------
def load_specs(family: str) -> list[dict]:
    return importlib.import_module(FAMILIES[family]).launch_specs()


def _worker_main() -> None:
    """``python -m a1_kernels.aot_common``: read ``[family, index, arch, use_cache]`` JSON lines on
    stdin, answer one JSON row per line on stdout."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT workers must not interpret"
    specs: dict[str, list[dict]] = {}
    for line in sys.stdin:
        family, index, arch, use_cache = json.loads(line)
        if family not in specs:
            specs[family] = load_specs(family)
        row = compile_and_inspect(specs[family][index], arch, use_cache)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.proc = subprocess.Popen([sys.executable, "-m", "a1_kernels.aot_common"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def run(self, job: list, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            why = f"timed out after {timeout:.0f} s" if not ready else \
                f"worker died:\n{self.proc.stderr.read()[-3000:]}"
            return {"compiled": False, "error": why}
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def compile_rows(jobs: Iterable[tuple[str, int, int]], workers: int | None = None,
                 use_cache: bool = True, timeout: float = 900.0, progress=None) -> list[dict]:
    """Compile ``(family, spec index, arch)`` jobs in ``workers`` processes; one result per job,
    in order (duplicate compilations are done once). ``progress(done, total, row)`` is called as
    results come in."""
    jobs = [tuple(j) for j in jobs]
    specs = {f: load_specs(f) for f in {j[0] for j in jobs}}
    unique: dict[str, tuple] = {}
    for fam, index, arch in jobs:
        unique.setdefault(fam + compile_key(specs[fam][index], arch), (fam, index, arch))
    # Slowest first (wide tiles, large head dims and k), so the pool drains evenly.
    todo = sorted(unique.items(), key=lambda kv: -_cost(specs[kv[1][0]][kv[1][1]]))
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def drain():
        worker = None
        while True:
            with lock:
                if not todo:
                    break
                ukey, (fam, index, arch) = todo.pop(0)
            worker = worker if worker and worker.proc.poll() is None else _Worker()
            row = worker.run([fam, index, arch, use_cache], timeout)
            with lock:
                results[ukey] = row
                if progress:
                    progress(len(results), len(unique), dict(row, arch=arch,
                                                             **_names(specs[fam][index])))
        if worker:
            worker.proc.stdin.close()
            worker.close()

    threads = [threading.Thread(target=drain) for _ in range(workers or default_workers())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = []
    for fam, index, arch in jobs:
        spec = specs[fam][index]
        out.append(dict(results[fam + compile_key(spec, arch)], family=fam, index=index,
                        arch=arch, **_names(spec)))
    return out


def _names(spec: dict) -> dict:
    return {"kernel": spec["kernel"], "config": spec["config"]}


def _cost(spec: dict) -> float:
    c = spec["constexprs"]
    return float(c.get("HEAD_DIM", 1) * c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1)
                 + c.get("KP", 0) * c.get("BLOCK_V", 0) * (c.get("SORT_MIN", 0) < c.get("KP", 0)))


# ------------------------------------------------------------------------------------------------
# Report rows and limits
# ------------------------------------------------------------------------------------------------
def report_row(spec: dict, result: dict) -> dict:
    """One report row: the compile result plus occupancy, work and roofline at the model shape."""
    arch = result["arch"]
    shape = spec["shape"]
    row = {"kernel": spec["kernel"], "config": spec["config"], "arch": f"sm_{arch}",
           "gpu": ARCHS[arch].gpu, "compiled": result["compiled"], "error": result.get("error"),
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
           "flops": float(shape["flops"]), "min_bytes": float(shape["min_bytes"]),
           "math": shape.get("math", "fp32"),
           "triton_version": result.get("triton_version")}
    row["roofline_us"] = roofline_us(arch, row["flops"], row["min_bytes"], row["math"])
    row["bound"] = "compute" if row["flops"] and row["flops"] / _PEAK[row["math"]](
        GPUS[ARCHS[arch].gpu]) * 1e6 >= row["roofline_us"] else "memory"
    for key in ("registers", "spill_bytes", "stack_bytes", "local_bytes", "static_shared",
                "dynamic_shared", "shared_bytes", "tensor_core_ops", "main_loop", "async_loads",
                "compile_s", "cached"):
        row[key] = result.get(key)
    if result["compiled"]:
        row["tensor_cores"] = bool(result["tensor_core_ops"])
        row["shared_fits"] = result["shared_bytes"] <= ARCHS[arch].smem_per_block
        occ = occupancy(arch, result["registers"], result["shared_bytes"], spec["num_warps"])
        row["occupancy"] = round(occ["occupancy"], 4)
        row["blocks_per_sm"], row["occupancy_limiter"] = occ["blocks_per_sm"], occ["limiter"]
    else:
        row["tensor_cores"] = row["shared_fits"] = row["occupancy"] = None
    return row


def limit_problems(spec: dict, row: dict, *, no_spill: bool, tensor_cores: bool) -> list[str]:
    """What a compiled row violates: compile error, shared memory, spills (when required),
    tensor cores (when required), unparsed registers. Empty when all is well."""
    what = f"{row['kernel']} [{row['config']}] {row['arch']}"
    if not row["compiled"]:
        return [f"{what} failed to compile:\n{row['error']}"]
    problems = []
    if not row["registers"]:
        problems.append(f"{what}: no registers parsed from cuobjdump")
    if not row["shared_fits"]:
        arch = int(row["arch"][3:])
        problems.append(f"{what}: {row['shared_bytes']} B shared > {ARCHS[arch].smem_per_block}")
    if no_spill and row["spill_bytes"]:
        problems.append(f"{what}: spills {row['spill_bytes']} B "
                        f"(stack {row['stack_bytes']}, local {row['local_bytes']})")
    if tensor_cores and not row["tensor_cores"]:
        problems.append(f"{what}: tl.dot does not reach the tensor cores")
    return problems


# ------------------------------------------------------------------------------------------------
# Memory traffic under the interpreter
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Traffic:
    """Bytes moved by ``tl.load``/``tl.store`` while counting, by tensor name.

    ``read``/``written``: total bytes (masked-off lanes excluded); ``read_unique``: distinct
    bytes; ``per_program``: for each program id (x, y, z), {name: (bytes read, distinct bytes
    read, bytes written)}; ``unknown``: bytes at addresses outside every named tensor (e.g. a
    scratch buffer a kernel materialises)."""

    read: dict
    written: dict
    read_unique: dict
    per_program: dict
    unknown: int

    def total(self) -> int:
        return sum(self.read.values()) + sum(self.written.values()) + self.unknown


@contextlib.contextmanager
def count_traffic(tensors: dict):
    """Count the bytes Triton kernels launched inside the block move, attributed to ``tensors``
    ({name: CPU tensor}) by address. Needs ``TRITON_INTERPRET=1`` (set before the kernels were
    imported): it wraps the interpreter's masked load/store, through which every ``tl.load`` and
    ``tl.store`` goes. Yields a ``Traffic`` filled when the block exits."""
    import numpy as np
    from triton.runtime import interpreter as interp

    ranges = sorted((t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()
                     - t.storage_offset() * t.element_size(), name) for name, t in tensors.items())
    starts = np.array([r[0] for r in ranges], dtype=np.uint64)
    events: list = []  # (kind, program, name, addresses)
    builder = interp.InterpreterBuilder
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store

    def record(self, kind, ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addr = ptrs.data[mask.data] if mask is not None else ptrs.data.reshape(-1)
        addr = addr.astype(np.uint64).reshape(-1)
        which = np.searchsorted(starts, addr, side="right") - 1
        program = tuple(int(i) for i in self.grid_idx)
        for i in np.unique(which):
            sel = addr[which == i]
            name = ranges[i][2] if i >= 0 and int(sel.max()) < ranges[i][1] else None
            events.append((kind, program, name, sel, size))

    def load(self, ptrs, mask, other, *args):
        record(self, "r", ptrs, mask)
        return orig_load(self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        record(self, "w", ptrs, mask)
        return orig_store(self, ptrs, value, mask, *args)

    out = Traffic({}, {}, {}, {}, 0)
    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield out
    finally:
        builder.create_masked_load, builder.create_masked_store = orig_load, orig_store
    seen: dict = {}
    per_prog: dict = {}
    for kind, program, name, addr, size in events:
        nbytes = addr.size * size
        if name is None:
            out.unknown += nbytes
            continue
        book = out.read if kind == "r" else out.written
        book[name] = book.get(name, 0) + nbytes
        entry = per_prog.setdefault(program, {}).setdefault(name, [0, [], 0, size])
        if kind == "r":
            entry[0] += nbytes
            entry[1].append(addr)
            seen.setdefault(name, []).append(addr)
        else:
            entry[2] += nbytes
    for name, chunks in seen.items():
        size = next(e[name][3] for e in per_prog.values() if name in e)
        out.read_unique[name] = int(np.unique(np.concatenate(chunks)).size) * size
    for program, names in per_prog.items():
        out.per_program[program] = {
            n: (e[0], int(np.unique(np.concatenate(e[1])).size) * e[3] if e[1] else 0, e[2])
            for n, e in names.items()}


if __name__ == "__main__":
    _worker_main()
