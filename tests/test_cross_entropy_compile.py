"""The fused cross-entropy's Triton kernels compile for sm_80 and sm_90 with the real Triton
compiler (no GPU), in bf16 and fp32, without register spills and within shared memory.

Compiled in worker processes without ``TRITON_INTERPRET`` by ``a1_kernels.aot_common``, which
reads registers and spills with the wheel's ``cuobjdump`` and raises when it cannot parse them.
The matmuls around the kernels are cuBLAS (``torch.matmul``): no tensor-core check here. The
TP size only changes runtime arguments, so only tp=1 is compiled.
"""
from a1_kernels import aot_common as aot
from a1_kernels.cross_entropy.aot import launch_specs


def test_kernels_compile_sm80_sm90_without_spills():
    specs = launch_specs()
    jobs = [("cross_entropy", i, arch) for i, s in enumerate(specs) if s["shape"]["tp"] == 1
            for arch in (80, 90)]
    rows = [aot.report_row(specs[r["index"]], r) for r in aot.compile_rows(jobs)]
    problems = []
    for (_, i, _), row in zip(jobs, rows):
        problems += aot.limit_problems(specs[i], row, no_spill=True, tensor_cores=False)
    assert not problems, "\n".join(problems)
    assert {r["kernel"] for r in rows} == {"_ce_stats_kernel", "_ce_grad_kernel"}
    assert len(rows) == 8 and all(r["registers"] > 0 for r in rows)
