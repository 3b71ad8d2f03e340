"""The step's throughput figures: model FLOPs by hand, and tokens/FLOPs summed over data-parallel
replicas whose rollout packs are uneven (one may hold only padding)."""
import torch

from megatron_a1.testing import run_multirank
from megatron_a1.training.metrics import FlopModel, step_counts

FLOPS = FlopModel(active_matmul_params=1000, attention_layers=2, attention_width=8,
                  gdn_layers=3, gdn_flops_per_token=50)


def pack(doc_lengths, padding=0):
    cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()])
    return {"cu_seqlens": cu, "num_padding": padding}


def test_step_flops_by_hand():
    # 3 x (2·1000·T + 2 layers · 2·8·Σl² + 3·50·T), T = 5 + 3
    want = 3 * (2 * 1000 * 8 + 2 * 2 * 8 * (25 + 9) + 3 * 50 * 8)
    assert FLOPS.step_flops([5, 3]) == want
    assert step_counts([pack([5]), pack([3])], FLOPS) == (8, float(want))
    # a padded pack: its last segment is the padding, neither tokens nor model FLOPs
    assert step_counts([pack([5, 3, 2], padding=2)], FLOPS) == (8, float(want))


def _body(rank, world_size):
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.runtime.parallel import ParallelConfig

    initialize(ParallelConfig(), seed=0)
    from megatron.core import parallel_state

    # rank 0: one pack of padding only (cu_seqlens covers the pad segment); rank 1: real docs
    micro = [pack([4], padding=4)] if rank == 0 else [pack([6, 2]), pack([3])]
    out = step_counts(micro, FLOPS, parallel_state.get_data_parallel_group())
    destroy()
    return out


def test_step_counts_sum_over_data_parallel_replicas():
    got = run_multirank(_body, 2)
    want_flops = FLOPS.step_flops([6, 2]) + FLOPS.step_flops([3])  # padding is not model work
    assert got == [(11, want_flops)] * 2  # the same figure on every rank
