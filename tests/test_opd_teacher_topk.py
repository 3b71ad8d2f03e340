"""OPD from a precomputed teacher top-k: the co-located teacher is the oracle.

* ``sva_from_topk`` (student logits on the stored ids only) equals the full-logits reference in
  value and gradients, with ties in the teacher and padded vocabulary rows, on one rank and
  vocab-parallel over two;
* ``tools/precompute_teacher_topk.py``'s store, read by the trainer, gives the same OPD losses
  and updated weights as the same teacher co-located; one rank and two (EP=2, sharded documents)
  write the same store; a store for another dataset, domain, k or vocabulary is refused.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import a1_kernels.sva.from_topk as from_topk
from a1_kernels.sva import sva_from_topk
from a1_kernels.sva.reference import fused_linear_sva_reference, salient_set_reference
from megatron_a1.testing import run_multirank


def write_dataset(*args, **kwargs):
    # the trainer tests' helpers are imported lazily: spawned ranks of the kernel test import
    # this module, and they need none of the trainer
    from test_train_loop import write_dataset as write

    return write(*args, **kwargs)


def train_body(rank, world_size, overrides):
    from test_train_loop import train_body as body

    return body(rank, world_size, overrides)


def base_overrides(*args, **kwargs):
    from test_train_loop import base_overrides as overrides

    return overrides(*args, **kwargs)


def opd_overrides(*args, **kwargs):
    from test_train_opd import opd_overrides as overrides

    return overrides(*args, **kwargs)

T, H, V, VOCAB, K = 37, 16, 48, 43, 6


def _tied_problem(seed=0):
    """Student [T, H]/[V, H]; a teacher with small-integer logits (many exact ties, also across
    the k-th place) whose padded rows (ids >= VOCAB) would win if they were not excluded."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    h_t = torch.randint(-1, 2, (T, H), generator=g).float()
    w_t = torch.randint(-1, 2, (V, H), generator=g).float()
    w_t[VOCAB:] = 5.0
    return h, w, h_t, w_t


@pytest.mark.parametrize("kernel", [True, False], ids=["triton_topk", "sorted_topk"])
def test_sva_from_topk_equals_reference(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton top-k needs a GPU or TRITON_INTERPRET=1")
    h, w, h_t, w_t = _tied_problem()
    logits_t = h_t @ w_t.t()
    ids, vals = from_topk.teacher_topk(logits_t, K, vocab_size=VOCAB)
    assert torch.equal(ids, salient_set_reference(logits_t, K, VOCAB))  # ties: lower id first
    kth, nxt = logits_t[:, :VOCAB].sort(-1, descending=True).values[:, K - 1:K + 1].unbind(-1)
    assert (kth == nxt).any(), "the problem must have ties across the k-th place"
    assert int(ids.max()) < VOCAB

    grad_out = torch.rand(T)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fused_linear_sva_reference(hs, ws, h_t, w_t, K, vocab_size=VOCAB)
    (ref * grad_out).sum().backward()
    perm = torch.randperm(K)  # S is a set: the order of the stored ids does not matter
    log_probs = vals - torch.logsumexp(logits_t[:, :VOCAB], -1, keepdim=True)  # also fine
    for t_ids, t_vals in ((ids, vals), (ids[:, perm].int(), log_probs[:, perm])):
        hm, wm = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = sva_from_topk(hm, wm, t_ids, t_vals, chunk_size=5)  # several sub-chunks
        (loss * grad_out).sum().backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hm.grad, hs.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wm.grad, ws.grad, rtol=1e-5, atol=1e-6)
        assert (wm.grad[VOCAB:] == 0).all()


def test_sva_from_topk_checks_inputs():
    h, w, _, _ = _tied_problem()
    ids = torch.zeros(T, K, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be in"):
        sva_from_topk(h, w, ids + V, torch.zeros(T, K))
    with pytest.raises(ValueError, match="teacher_ids"):
        sva_from_topk(h, w, ids[:-1], torch.zeros(T - 1, K))


def _tp_body(rank, world_size):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    h, w, h_t, w_t = _tied_problem(seed=1)
    ids, vals = from_topk.teacher_topk(h_t @ w_t.t(), K, vocab_size=VOCAB)
    shard = V // world_size
    hm = h.clone().requires_grad_()
    wm = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss = sva_from_topk(hm, wm, ids, vals, tp_group=torch.distributed.group.WORLD)
    (loss * torch.linspace(0.5, 1.5, T)).sum().backward()
    return loss.detach(), hm.grad, wm.grad


def test_sva_from_topk_vocab_parallel_equals_one_rank():
    h, w, h_t, w_t = _tied_problem(seed=1)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fused_linear_sva_reference(hs, ws, h_t, w_t, K, vocab_size=VOCAB)
    (ref * torch.linspace(0.5, 1.5, T)).sum().backward()
    results = run_multirank(_tp_body, 2)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), ws.grad, rtol=1e-5, atol=1e-6)
    for loss, grad_h, _ in results:
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_h, hs.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The store through the trainer
# ------------------------------------------------------------------------------------------------
# The ranks run PyTorch paths (core attention, the co-located SVA oracle, the sorted top-k): fast,
# and the oracle is the plain reference. The two-rank store runs the Triton top-k (interpreter).
TORCH_PATHS = {"TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Rollouts (domains search/tool alternate), the student's init, a teacher SFT'd from it."""
    root = tmp_path_factory.mktemp("opd_topk")
    data = write_dataset(str(root / "rollouts"), n_docs=16, seed=3)
    init, teacher = str(root / "init"), str(root / "teacher")
    run_multirank(train_body, 1, args=(base_overrides(data, init, steps=0),), env=TORCH_PATHS)
    run_multirank(train_body, 1, args=(base_overrides(data, teacher, steps=3, init=init),),
                  env=TORCH_PATHS)
    return data, init, teacher


def precompute_body(rank, world_size, overrides, teacher, domains, output, topk):
    from megatron_a1.configs import load_config
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.teacher_topk import precompute

    cfg = load_config(TrainConfig, None, overrides)
    return precompute(cfg, teacher, domains, output, topk=topk, progress=False)


def load_plain(rank, world_size, *ckpt_dirs):
    """Full tensors of each checkpoint dir's latest checkpoint (model weights only)."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from megatron_a1.training.checkpoint import latest_checkpoint

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    return [{k: v for k, v in load_plain_tensors(latest_checkpoint(d)).items()
             if torch.is_tensor(v) and not k.startswith("optimizer")} for d in ckpt_dirs]


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    data, init, teacher = setup
    root = tmp_path_factory.mktemp("topk")
    out = str(root / "search")
    cfg = opd_overrides(data, str(root / "unused"), init, {"search": teacher})
    [manifest] = run_multirank(precompute_body, 1, args=(cfg, teacher, ["search"], out, 12),
                               env=TORCH_PATHS)
    return out, manifest


def test_store_manifest_and_layout(setup, store):
    data, _, teacher = setup
    path, manifest = store
    assert sorted(os.listdir(path)) == ["manifest.json", "shard_00000"]
    on_disk = json.load(open(os.path.join(path, "manifest.json")))
    assert on_disk == manifest
    assert manifest["k"] == 12 and manifest["vocab_size"] == 128
    assert manifest["domains"] == ["search"]
    assert manifest["teacher"] == os.path.abspath(teacher)
    [ds] = manifest["datasets"]
    assert ds["documents"] == 16 and ds["served_documents"] == 8  # write_dataset alternates
    from megatron_a1.data.indexed import DocumentStore
    from megatron_a1.training.teacher_topk import TeacherTopkStore

    st, docs = TeacherTopkStore(path), DocumentStore(data)
    st.bind([data])
    for d in range(0, 16, 2):
        positions, ids, logits = st.document(0, d)
        mask = docs.loss_mask(d)
        assert positions.tolist() == np.flatnonzero(mask[1:]).tolist()
        assert ids.shape == logits.shape == (len(positions), 12)
        assert (np.diff(logits, axis=1) <= 0).all()  # descending teacher logits


def test_two_ranks_write_the_same_store(setup, store, tmp_path):
    """EP=2 (DP=2): each rank scores every other document (Triton top-k here, sorted top-k in
    the one-rank store); the store equals one rank's, ties included."""
    from megatron_a1.training.teacher_topk import TeacherTopkStore

    data, init, teacher = setup
    out = str(tmp_path / "search2")
    cfg = opd_overrides(data, str(tmp_path / "unused"), init, {"search": teacher}) + \
        ["parallel.expert_parallel=2"]
    run_multirank(precompute_body, 2, args=(cfg, teacher, ["search"], out, 12))
    one, two = TeacherTopkStore(store[0]), TeacherTopkStore(out)
    assert len(two.manifest["shards"]) == 2
    one.bind([data]), two.bind([data])
    for d in range(0, 16, 2):
        a, b = one.document(0, d), two.document(0, d)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-6)


def test_opd_step_from_store_equals_colocated_teacher(setup, store, tmp_path):
    """The search teacher co-located vs its precomputed top-12 (opd.topk=8): same losses, same
    weights after two optimizer steps (the tool domain keeps its co-located teacher)."""
    data, init, teacher = setup
    colocated = opd_overrides(data, str(tmp_path / "a"), init, {"search": teacher, "tool": init})
    from_store = opd_overrides(data, str(tmp_path / "b"), init, {"tool": init}) + \
        [f"opd.teacher_topk={{search: {store[0]}}}"]
    [ref] = run_multirank(train_body, 1, args=(colocated,), env=TORCH_PATHS)
    [got] = run_multirank(train_body, 1, args=(from_store,), env=TORCH_PATHS)
    assert ref["losses"][0] > 1e-3
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-7)
    [[w_ref, w_got, w_init]] = run_multirank(load_plain, 1, args=(
        ref["checkpoint_dir"], got["checkpoint_dir"], init))
    assert_trained_alike(w_ref, w_got, w_init)


def assert_trained_alike(w_ref: dict, w_got: dict, w_init: dict) -> None:
    """Two runs' weights agree, and the steps moved most of them away from ``w_init``.

    Tolerance: the two steps at lr 5e-3 move weights by ~5e-3; Adam's first steps normalise
    each gradient element by its own size, so an element with a near-zero gradient turns
    float-rounding differences of the two loss paths into ~1e-6 weight differences (which
    CPU's vector width decides). 1e-5 is 0.2% of a step's movement: a real difference in the
    losses or gradients moves weights by the order of the step itself."""
    assert w_ref.keys() == w_got.keys() and len(w_ref) > 5
    moved = 0
    for name, value in w_ref.items():
        torch.testing.assert_close(w_got[name], value, rtol=1e-5, atol=1e-5, msg=name)
        moved += not torch.equal(value, w_init[name])
    assert moved > len(w_ref) // 2, "the steps must have changed the weights"


def test_store_for_another_dataset_is_refused(setup, store, tmp_path):
    from megatron_a1.configs import load_config
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.teacher_topk import StoreMismatchError, build_stores

    data, init, _ = setup
    other = write_dataset(str(tmp_path / "other"), n_docs=16, seed=5)

    def cfg(prefix, *extra):
        return load_config(TrainConfig, None, opd_overrides(prefix, str(tmp_path / "c"), init,
                                                            {"tool": init}) +
                           [f"opd.teacher_topk={{search: {store[0]}}}", *extra])

    assert build_stores(cfg(data), vocab_size=128)["search"].k == 12
    with pytest.raises(StoreMismatchError, match=r"was built for .*rollouts \(16 documents\), "
                       r"not for data.prefixes\[0\]=.*other \(8 documents of \['search'\]; .*"
                       r"rebuild the store"):
        build_stores(cfg(other), vocab_size=128)
    with pytest.raises(StoreMismatchError, match="opd.topk=16 needs more"):
        build_stores(cfg(data, "opd.topk=16"), vocab_size=128)
    with pytest.raises(StoreMismatchError, match="vocabulary of 128, this run 100"):
        build_stores(cfg(data, "opd.real_vocab_size=100"), vocab_size=128)
    with pytest.raises(StoreMismatchError, match=r"built for domains \['search'\], not \['tool'\]"):
        build_stores(cfg(data, f"opd.teacher_topk={{search: {store[0]}, tool: {store[0]}}}"),
                     vocab_size=128)
