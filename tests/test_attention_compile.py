"""The packed-attention kernels compile for real GPUs (sm_80, sm_90) with no GPU present.

Each spec of ``a1_kernels.attention.aot.launch_specs()`` is compiled by Triton's real compiler in
a subprocess without ``TRITON_INTERPRET``; ``cuobjdump`` (shipped in the Triton wheel) reads the
cubin's registers, stack (spill) bytes and SASS. Checked: compiles; shared memory fits the
architecture; no spills for head dim <= 128; ``tl.dot`` reaches the tensor cores (``HMMA`` /
``HGMMA``). The default run compiles the model's shapes (head dim 256 and 128, bf16, the first
config of every kernel); ``-m slow`` compiles every (kernel, head dim, dtype, config).
"""
import json
import os
import subprocess
import sys

import pytest

from a1_kernels.attention.aot import launch_specs

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from a1_kernels.attention.aot import compile_spec, launch_specs
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
specs = launch_specs()
for item in json.loads(sys.argv[1]):
    spec, arch = specs[item[0]], item[1]
    row = {"index": item[0], "arch": arch, "kernel": spec["kernel"], "config": spec["config"]}
    try:
        kernel = compile_spec(spec, arch)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        print(json.dumps(row), flush=True)
        continue
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        cuobjdump = os.path.join(bin_dir, "cuobjdump")
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    row["registers"] = int(re.search(r"REG:(\d+)", res).group(1))
    row["stack"] = int(re.search(r"STACK:(\d+)", res).group(1))
    row["local"] = int(re.search(r"LOCAL:(\d+)", res).group(1))
    row["shared"] = int(kernel.metadata.shared) + int(re.search(r"SHARED:(\d+)", res).group(1))
    row["hmma"], row["hgmma"] = "HMMA" in sass, "HGMMA" in sass
    print(json.dumps(row), flush=True)
"""


def _compile(items):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(items)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(items), proc.stderr[-3000:]
    return rows


def _check(rows, specs):
    for row in rows:
        what = f"{row['kernel']} {row['config']} sm_{row['arch']}"
        assert "error" not in row, f"{what} failed to compile:\n{row['error']}"
        assert row["shared"] <= SMEM_LIMIT[row["arch"]], f"{what}: {row['shared']} B shared"
        if specs[row["index"]]["constexprs"]["HEAD_DIM"] <= 128:
            assert row["stack"] == 0 and row["local"] == 0, f"{what} spills: {row}"
        # fp32 uses tf32x3 products: tensor cores too.
        assert row["hmma"] or row["hgmma"], f"{what}: tl.dot does not reach the tensor cores"
        if row["arch"] == 80:
            assert row["hmma"], what


def test_model_shape_kernels_compile_for_sm80_and_sm90():
    specs = launch_specs()
    first = {}
    for i, s in enumerate(specs):
        d, dtype = s["shape"]["head_dim"], s["shape"]["dtype"]
        if dtype == "bf16" and d in (128, 256):
            first.setdefault((s["kernel"], d), i)
    items = [[i, 90] for i in first.values()]
    items += [[i, 80] for (kernel, d), i in first.items() if d == 256]
    rows = _compile(items)
    _check(rows, specs)
    # bf16 tiles of 64+ rows go to Hopper's warpgroup MMA for the forward kernel.
    fwd90 = [r for r in rows if r["arch"] == 90 and r["kernel"] == "attention_fwd"]
    assert fwd90 and all(r["hgmma"] for r in fwd90)


@pytest.mark.slow
def test_every_launch_config_compiles_for_sm80_and_sm90():
    specs = launch_specs()
    rows = _compile([[i, arch] for i in range(len(specs)) for arch in (80, 90)])
    _check(rows, specs)


def test_launch_specs_cover_every_autotune_choice():
    from a1_kernels.attention.ops import KERNELS, configs_for
    import torch

    specs = launch_specs()
    seen = {(s["kernel"], s["config"]) for s in specs}
    for name in KERNELS:
        for d in (64, 128, 256):
            for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                            (torch.float32, "fp32")):
                for cfg in configs_for(name, d, dt):
                    assert (f"attention_{name}", f"d{d}-{tag}-{cfg.text()}") in seen
    for s in specs:
        assert set(s) >= {"kernel", "fn", "signature", "constexprs", "num_warps", "num_stages",
                          "config", "shape"}
        assert s["shape"]["flops"] > 0 and s["shape"]["min_bytes"] > 0
        assert set(s["signature"]) == set(s["fn"].arg_names)
