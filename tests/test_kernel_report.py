"""The kernel report's pieces: cuobjdump parsing, occupancy, roofline, the disk cache, the tool's
output, and the memory traffic counted under the interpreter (this process interprets)."""
import importlib.util
import json
import os

import pytest

from a1_kernels import aot_common as aot

# Verbatim `cuobjdump -res-usage` of _sva_set_loss_kernel compiled for sm_90 by Triton 3.7.1.
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _sva_set_loss_kernel:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _tool():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "kernel_report.py")
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_res_usage_parsing_reads_numbers_or_raises():
    got = aot.parse_res_usage(RES_USAGE)
    assert got == {"registers": 32, "stack_bytes": 0, "local_bytes": 0, "spill_bytes": 0,
                   "static_shared": 1024}
    spilled = aot.parse_res_usage(RES_USAGE.replace("STACK:0", "STACK:16"))
    assert spilled["spill_bytes"] == 16
    for bad in ("", "Resource usage:\n", RES_USAGE.replace("REG:32", "REG:0"), RES_USAGE * 2):
        with pytest.raises(RuntimeError):
            aot.parse_res_usage(bad)
    sass = "        /*0a10*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;\n  HMMA.16816.F32 R1 ;"
    assert aot.tensor_core_ops(sass) == ["HGMMA", "HMMA"]
    assert aot.tensor_core_ops("  FFMA R1, R2, R3, R4 ;") == []


def test_occupancy_from_registers_shared_memory_and_warps():
    # 128 regs x 128 threads: 4096 regs per warp-unit ... 16 warps -> 4 blocks of 4 warps.
    assert aot.occupancy(90, 128, 0, 4) == {"blocks_per_sm": 4, "warps_per_sm": 16,
                                            "occupancy": 0.25, "limiter": "registers"}
    # 32 regs, 4 warps: 16 blocks by the warp limit.
    assert aot.occupancy(90, 32, 1024, 4)["blocks_per_sm"] == 16
    # 100 KB of shared memory: 2 blocks on H100 (228 KB), 1 on A100 (164 KB).
    assert aot.occupancy(90, 64, 100 * 1024, 4)["blocks_per_sm"] == 2
    occ = aot.occupancy(80, 64, 100 * 1024, 4)
    assert occ["blocks_per_sm"] == 1 and occ["limiter"] == "shared"
    # 255 regs (rounded to 256 per thread in units of 256 per warp): 8 warps per SM.
    assert aot.occupancy(80, 255, 0, 8)["warps_per_sm"] == 8


def test_roofline_uses_the_peak_table():
    for arch, gpu in ((80, "A100"), (90, "H100"), (100, "B200")):
        g = aot.GPUS[gpu]
        assert aot.ARCHS[arch].gpu == gpu and "datasheet" in g.source
        assert aot.roofline_us(arch, 0, g.hbm, "fp32") == pytest.approx(1e6)
        assert aot.roofline_us(arch, g.bf16, 1, "bf16") == pytest.approx(1e6)
        assert aot.roofline_us(arch, g.tf32, 1, "tf32x3") == pytest.approx(3e6)


def test_compile_rows_parses_caches_and_reports(tmp_path, monkeypatch):
    """A real compile of the small set-loss kernel for sm_90 in a worker process, then a rerun
    answered from the disk cache, then the tool's Markdown and JSON."""
    monkeypatch.setenv("A1_AOT_CACHE", str(tmp_path / "cache"))
    from a1_kernels.sva.aot import launch_specs

    specs = launch_specs()
    index = next(i for i, s in enumerate(specs)
                 if s["kernel"] == "_sva_set_loss_kernel" and s["shape"]["k"] == 64)
    (row,) = aot.compile_rows([("sva", index, 90)], workers=1)
    assert row["compiled"], row["error"]
    assert row["registers"] > 0 and row["spill_bytes"] == 0 and not row["cached"]
    assert row["triton_version"] and row["shared_bytes"] >= row["dynamic_shared"]
    (again,) = aot.compile_rows([("sva", index, 90)], workers=1)
    assert again["cached"] and again["registers"] == row["registers"]
    report = aot.report_row(specs[index], row)
    assert 0 < report["occupancy"] <= 1 and report["roofline_us"] > 0
    assert report["shared_fits"] and report["tensor_cores"] is False

    tool = _tool()
    monkeypatch.setattr(tool, "_quick", lambda s: s is specs[index] or (
        s["kernel"] == "_sva_set_loss_kernel" and s["shape"]["k"] == 64))
    out = tmp_path / "report.json"
    assert tool.main(["--arch", "sm_90", "--family", "sva", "--quick", "--no-traffic",
                      "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (r,) = data["rows"]
    for key in ("kernel", "config", "arch", "compiled", "error", "registers", "spill_bytes",
                "shared_bytes", "occupancy", "tensor_cores", "flops", "min_bytes", "roofline_us",
                "triton_version"):
        assert key in r
    assert r["arch"] == "sm_90" and r["registers"] == row["registers"]


def test_memory_traffic_meets_the_goals():
    """Counted under the interpreter: the SVA kernels move <= 1.5x their minimum, attention reads
    each visible K/V row once per query block and stores nothing but its outputs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("traffic is counted under TRITON_INTERPRET=1 (the CPU test-suite's mode)")
    from a1_kernels import traffic

    rows = traffic.measure()
    assert {r["kernel"].split()[0] for r in rows} >= {
        "attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "_sva_topk_kernel",
        "_sva_set_loss_kernel"}
    failed = [r for r in rows if not r["met"]]
    assert not failed, failed
    assert all(r["bytes"] > 0 for r in rows)
