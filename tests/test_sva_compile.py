"""Every SVA launch config compiles for sm_80 and sm_90 with the real Triton compiler (no GPU).

Compiled in worker processes without ``TRITON_INTERPRET`` by ``a1_kernels.aot_common``, which
reads registers and spills with the wheel's ``cuobjdump`` and raises when it cannot parse them
(so the no-spill check is never vacuous). The TP size only changes runtime arguments: specs that
differ only by it compile once. The SVA kernels have no ``tl.dot``; the fused-linear path's
matmuls are cuBLAS (``torch.matmul``/``bmm``), not Triton, so there is no tensor-core check here.

Default run: every top-k autotune config at the recipe's k=64 (bf16 logits) and the set-loss
kernel; ``-m slow``: k in {32, 64, 256}, bf16 and fp32.
"""
import pytest

from a1_kernels import aot_common as aot
from a1_kernels.sva.aot import launch_specs

ARCHS = (80, 90)


def _compile_and_check(select) -> list[dict]:
    specs = launch_specs()
    jobs = [("sva", i, arch) for i, s in enumerate(specs) if select(s) for arch in ARCHS]
    assert jobs
    rows = [aot.report_row(specs[r["index"]], r) for r in aot.compile_rows(jobs)]
    problems = []
    for (_, i, _), row in zip(jobs, rows):
        problems += aot.limit_problems(specs[i], row, no_spill=True, tensor_cores=False)
    assert not problems, "\n".join(problems)
    return rows


def test_recipe_configs_compile_sm80_sm90():
    rows = _compile_and_check(lambda s: s["shape"]["k"] == 64 and s["shape"].get("tp", 1) == 1
                              and s["shape"]["dtype"] in ("bf16", "fp32")
                              and (s["kernel"] != "_sva_topk_kernel" or s["shape"]["dtype"] == "bf16"))
    assert {r["kernel"] for r in rows} == {"_sva_topk_kernel", "_sva_set_loss_kernel"}
    assert all(r["registers"] > 0 for r in rows)


@pytest.mark.slow
def test_all_configs_compile_sm80_sm90():
    _compile_and_check(lambda s: s["shape"].get("tp", 1) == 1)


def test_autotuner_never_tries_a_spilling_tile():
    """The GPU autotuner's pruning and the AOT specs agree: tiles listed as spilling for a top-k
    buffer size are neither launched nor compiled for it."""
    from a1_kernels.sva import sva

    for kp, bad in sva.TOPK_SPILLING.items():
        kept = sva._prune_topk(sva._topk_configs(), {}, KP=kp)
        assert [(c.kwargs["BLOCK_V"], c.num_warps) for c in kept] == \
            [(c.kwargs["BLOCK_V"], c.num_warps) for c in sva._topk_configs(kp)]
        assert bad and not bad & {(c.kwargs["BLOCK_V"], c.num_warps) for c in kept}
    assert len(sva._prune_topk(sva._topk_configs(), {}, KP=64)) == len(sva.TOPK_TILES)
