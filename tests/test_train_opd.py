"""Stage 3 (OPD with SVA) through the trainer: oracle values, teacher routing, DP layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_a1.testing import run_multirank
from test_train_loop import base_overrides, train_body, write_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd")
    data = write_dataset(str(root / "rollouts"), n_docs=16, seed=3)
    init = str(root / "init")
    run_multirank(train_body, 1, args=(base_overrides(data, init, steps=0),))
    teacher = str(root / "teacher")  # a different model: SFT a few steps from the same init
    run_multirank(train_body, 1, args=(base_overrides(data, teacher, steps=3, init=init),))
    return data, init, teacher


def opd_overrides(data, ck, init, teachers: dict, steps=2):
    t = ", ".join(f"{d}: {p}" for d, p in teachers.items())
    return base_overrides(data, ck, steps=steps, init=init) + [
        "train.stage=opd", f"opd.teachers={{{t}}}", "opd.topk=8", "opd.chunk_size=64",
        "checkpoint.save_interval=0", "optim.lr=5e-3",
    ]


def test_student_equal_to_teacher_has_zero_loss(setup, tmp_path):
    data, init, _ = setup
    [s] = run_multirank(train_body, 1, args=(
        opd_overrides(data, str(tmp_path), init, {"search": init, "tool": init}, steps=1),))
    assert s["losses"][0] == pytest.approx(0.0, abs=1e-6)


def test_opd_loss_falls_and_layouts_agree(setup, tmp_path):
    """Two teachers routed by domain; the loss falls; EP=2 (DP=2) equals one rank."""
    data, init, teacher = setup
    teachers = {"search": teacher, "tool": init}
    [one] = run_multirank(train_body, 1, args=(opd_overrides(data, str(tmp_path / "a"), init,
                                                               teachers),))
    assert one["losses"][0] > 1e-3 and one["losses"][-1] < one["losses"][0], one["losses"]
    # the logged per-domain losses average (over the domains present) to the step's loss
    import json

    for row in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")):
        per_domain = [v for k, v in row.items() if k.startswith("loss/")]
        assert len(per_domain) == 2
        assert sum(per_domain) / 2 == pytest.approx(row["loss"], rel=1e-5)
    two = run_multirank(train_body, 2, args=(opd_overrides(data, str(tmp_path / "b"), init,
                                                             teachers) +
                                               ["parallel.expert_parallel=2"],))
    for s in two:
        np.testing.assert_allclose(s["losses"], one["losses"], rtol=2e-4, atol=1e-7)


def test_domain_weights_match_hand_computation():
    """w_t = 1 / (D * N_d * |R_i|) over the global batch, on a hand-made 2-micro-batch step."""
    from megatron_a1.training.opd import OPDStage

    stage = OPDStage.__new__(OPDStage)
    stage.domains, stage.teachers = ["search", "tool"], {"search": None, "tool": None}
    stage.server_groups = ()  # no served teacher: nothing to fetch
    mb1 = {"cu_seqlens": torch.tensor([0, 3, 7]), "domains": ["search", "tool"],
           "loss_mask": torch.tensor([[1., 1, 0, 0, 1, 1, 1]])}
    mb2 = {"cu_seqlens": torch.tensor([0, 4]), "domains": ["search"],
           "loss_mask": torch.tensor([[0., 1, 1, 1]])}
    import megatron_a1.training.opd as opd

    class _PS:  # a single-process data-parallel group
        get_data_parallel_group = staticmethod(lambda: None)
        get_data_parallel_world_size = staticmethod(lambda: 1)

    real_ps, real_ar = opd.parallel_state, torch.distributed.all_reduce
    opd.parallel_state, torch.distributed.all_reduce = _PS, lambda *a, **k: None
    try:
        stage.prepare([mb1, mb2])
    finally:
        opd.parallel_state, torch.distributed.all_reduce = real_ps, real_ar
    # domains present D=2; search has 2 samples (|R|=2 and 3), tool 1 sample (|R|=3)
    torch.testing.assert_close(mb1["sva_weight"], torch.tensor(
        [1 / (2 * 2 * 2), 1 / 8, 0, 0, 1 / (2 * 1 * 3), 1 / 6, 1 / 6]))
    torch.testing.assert_close(mb2["sva_weight"], torch.tensor([0, 1 / 12, 1 / 12, 1 / 12]))
    assert mb1["sva_scale"] == 2
    # the weights sum to 1 (a mean of means)
    assert float(mb1["sva_weight"].sum() + mb2["sva_weight"].sum()) == pytest.approx(1.0)
