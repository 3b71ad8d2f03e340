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


# Two innermost loops (an HGMMA one with a cp.async load, an mma.sync one with a plain load)
# inside an outer loop, in cuobjdump's layout (one instruction per line, encodings dropped).
LOOPS_SASS = """
        /*0100*/                   MOV R1, R2 ;
        /*0110*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0120*/                   WARPGROUP.ARRIVE ;
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0140*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0150*/              @P0 BRA 0x100 ;
        /*0160*/                   LDG.E R5, desc[UR4][R6.64] ;
        /*0170*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0180*/              @P1 BRA 0x160 ;
        /*0190*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R9 ;
        /*01a0*/              @P2 BRA 0x100 ;
        /*01b0*/                   EXIT ;
"""


def test_main_loop_is_the_innermost_loop_with_the_most_mma_work():
    loop = aot.main_loop(LOOPS_SASS)
    # 64x64x16 warpgroup MMA: 2*64*64*16 FLOPs over the 4 warps that issue it.
    assert loop == {"instructions": 6, "mma_flops": 32768,
                    "insts_per_kflop": round(6000 / 32768, 3),
                    "mma_shapes": {"HGMMA.64x64x16": 1}, "warpgroup_waits": 1,
                    "ldgsts": 1, "utmaldg": 0, "ldg": 0, "atomics": 0}
    assert aot.async_load_counts(LOOPS_SASS) == {"ldgsts": 1, "utmaldg": 0, "ldg": 1, "atomics": 1}
    hmma_only = LOOPS_SASS.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT", "NOP")
    assert aot.main_loop(hmma_only)["mma_shapes"] == {"HMMA.16816": 1}
    assert aot.main_loop("        /*0100*/                   EXIT ;") is None


def test_launch_specialization_matches_the_launcher():
    """Aligned tensors and 16-divisible ints get tt.divisibility 16, 1 becomes a constant, other
    ints stay plain i32 (what Triton's launcher does for a real call)."""
    import torch

    from a1_kernels.sva.sva import _sva_set_loss_kernel

    f32 = torch.empty(0, dtype=torch.float32)
    base = {"s_ptr": f32, "t_ptr": f32, "loss_ptr": f32, "coef_ptr": f32, "K": 64, "KP": 64,
            "BLOCK_R": 16}
    sig, consts, attrs = aot.launch_specialization(_sva_set_loss_kernel, dict(base, n_rows=4096))
    assert sig["s_ptr"] == "*fp32" and sig["n_rows"] == "i32" and sig["K"] == "constexpr"
    assert consts == {"K": 64, "KP": 64, "BLOCK_R": 16}
    assert attrs == {(i,): [["tt.divisibility", 16]] for i in range(5)}
    sig, consts, attrs = aot.launch_specialization(_sva_set_loss_kernel, dict(base, n_rows=7))
    assert (4,) not in attrs and sig["n_rows"] == "i32"
    sig, consts, _ = aot.launch_specialization(_sva_set_loss_kernel, dict(base, n_rows=1))
    assert sig["n_rows"] == "constexpr" and consts["n_rows"] == 1
    with pytest.raises(KeyError, match="n_rows"):
        aot.launch_specialization(_sva_set_loss_kernel, base)


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
                "triton_version", "main_loop", "async_loads"):
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
