"""Checkpoints across parallel layouts, and the ways a resume is steered or saved from a bad disk.

Steps 1-2 run under layout A and checkpoint, steps 3-4 resume under layout B; their losses equal
an uninterrupted single-rank run's (model weights and Adam state reshard through megatron-core's
``dist_checkpointing``): EP 2 -> 1, TP 2 -> 1, PP 2 -> 1, and EP 1 -> 2 after falling back from a
corrupt checkpoint. The runs are shared with ``test_convert_export.py`` (:func:`runs`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_a1.testing import MultiRankError, run_multirank
from megatron_a1.training import checkpoint as ckpt
from test_train_loop import base_overrides, train_body, write_dataset

EP2, TP2 = "parallel.expert_parallel=2", "parallel.tensor_parallel=2"
LAYOUTS = {"ep2": [EP2], "tp2": [TP2, "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline_parallel=2"]}


class Runs:
    """Runs made once per test session, on demand: the dataset, the initial weights, the
    uninterrupted single-rank reference (checkpoints at steps 2 and 4) and, per layout, a run
    of the same 4-step schedule stopped after step 2."""

    def __init__(self, root):
        self.root = root
        self.dataset = write_dataset(str(root / "synthetic"))
        self.init = str(root / "init")
        run_multirank(train_body, 1, args=(base_overrides(self.dataset, self.init, steps=0),))
        self.ref_dir = str(root / "ref")
        [self.ref] = run_multirank(train_body, 1, args=(self.overrides(self.ref_dir),))
        self._stopped: dict[str, str] = {}

    def overrides(self, ckpt_dir: str, *extra: str) -> list[str]:
        return base_overrides(self.dataset, ckpt_dir, 4, self.init) + list(extra)

    def stopped_at_2(self, layout: str) -> str:
        """Checkpoint dir of the 2-rank run under ``layout`` stopped after step 2."""
        if layout not in self._stopped:
            d = str(self.root / f"stopped_{layout}")
            results = run_multirank(train_body, 2, args=(
                self.overrides(d, "train.exit_interval=2", *LAYOUTS[layout]),))
            for summary in results:
                np.testing.assert_allclose(summary["losses"], self.ref["losses"][:2], rtol=1e-5)
            self._stopped[layout] = d
        return self._stopped[layout]

    def copy(self, src: str, dst: str, upto: int | None = None) -> str:
        """A copy of checkpoint dir ``src`` (its checkpoints up to iteration ``upto``)."""
        os.makedirs(dst)
        names = [n for n in os.listdir(src) if n.startswith("iter_")
                 and (upto is None or int(n[5:]) <= upto)]
        for n in names:
            shutil.copytree(os.path.join(src, n), os.path.join(dst, n))
        with open(os.path.join(dst, "latest"), "w") as f:
            f.write(max(names) + "\n")
        return dst


_RUNS: list[Runs] = []


def runs(tmp_path_factory) -> Runs:
    """The session's shared :class:`Runs` (made on first use)."""
    if not _RUNS:
        _RUNS.append(Runs(tmp_path_factory.mktemp("layout_runs")))
    return _RUNS[0]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Runs:
    return runs(tmp_path_factory)


@pytest.mark.parametrize("saved", ["ep2", "tp2", "pp2"])
def test_resume_on_one_rank_from_another_layout(shared, tmp_path, saved):
    """Model and optimizer state saved under EP=2, TP=2+SP or PP=2 resume on one rank: steps
    3-4 give the uninterrupted run's losses (a fresh optimizer would not: see the weights-only
    test). EP 1 -> 2: the corrupt-checkpoint test."""
    d = shared.copy(shared.stopped_at_2(saved), str(tmp_path / "ck"))
    [summary] = run_multirank(train_body, 1, args=(shared.overrides(d),))
    np.testing.assert_allclose(summary["losses"], shared.ref["losses"][2:], rtol=1e-5)


def _adam_step(path: str) -> float:
    from megatron.core import dist_checkpointing

    return ckpt._saved_step(dist_checkpointing.load_common_state_dict(path)["optimizer"])


def test_weights_only_resume_starts_a_fresh_optimizer_and_schedule(shared, tmp_path):
    """checkpoint.load_optimizer=false: step 3 sees the saved weights (the reference's loss),
    with the schedule's first learning rate and an Adam that has taken 2 steps, not 4."""
    d = shared.copy(shared.ref_dir, str(tmp_path / "ck"), upto=2)
    [summary] = run_multirank(train_body, 1, args=(shared.overrides(
        d, "checkpoint.load_optimizer=false", "checkpoint.load_rng=false"),))
    ref = shared.ref["losses"]
    assert summary["losses"][0] == ref[2]
    assert abs(summary["losses"][1] - ref[3]) > 1e-3 * ref[3]  # the tolerance above is tight
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    ref_rows = [json.loads(line) for line in open(os.path.join(shared.ref_dir, "metrics.jsonl"))]
    assert rows[0]["lr"] == ref_rows[0]["lr"] != ref_rows[2]["lr"]
    assert _adam_step(os.path.join(d, "iter_0000004")) == 2
    assert _adam_step(os.path.join(shared.ref_dir, "iter_0000004")) == 4


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_falls_back_on_every_rank_and_resumes_under_ep2(shared, tmp_path):
    """The single-rank reference's checkpoints with a truncated shard in the newest: both ranks
    of an EP=2 run resume from the previous one (EP 1 -> 2, model and optimizer state), train
    steps 3-4 again and match the reference."""
    d = shared.copy(shared.ref_dir, str(tmp_path / "ck"))
    _truncate(os.path.join(d, "iter_0000004", "__0_0.distcp"))
    results = run_multirank(train_body, 2, args=(shared.overrides(d, *LAYOUTS["ep2"]),))
    for summary in results:
        np.testing.assert_allclose(summary["losses"], shared.ref["losses"][2:], rtol=1e-5)
    assert ckpt.checkpoint_problem(os.path.join(d, "iter_0000004")) is None  # saved anew
    assert ckpt.latest_checkpoint(d) == os.path.join(d, "iter_0000004")


def test_choosing_the_checkpoint(shared, tmp_path):
    d = shared.copy(shared.ref_dir, str(tmp_path / "ck"))
    it2, it4 = os.path.join(d, "iter_0000002"), os.path.join(d, "iter_0000004")
    assert ckpt._choose(d, None, strict=False) == (it4, [])
    assert ckpt._choose(d, 2, strict=False) == (it2, [])
    with pytest.raises(ckpt.CheckpointError, match=r"load_iteration=3: .*iter_0000003 does not "
                       r"exist; available: \['iter_0000002', 'iter_0000004'\]"):
        ckpt._choose(d, 3, strict=False)
    assert ckpt._choose(str(tmp_path / "empty"), None, strict=False) == (None, [])

    shard = os.path.join(it4, "__0_0.distcp")
    _truncate(shard)
    path, warnings = ckpt._choose(d, None, strict=False)
    assert path == it2
    assert f"{shard} has" in warnings[0] and "truncated" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(shard)} has .*strict_load=true"):
        ckpt._choose(d, None, strict=True)
    with pytest.raises(ckpt.CheckpointError, match="load_iteration=4: .* is incomplete"):
        ckpt._choose(d, 4, strict=False)
    path, warnings = ckpt._choose_and_mark(d, None, strict=False)  # what rank 0 runs
    assert ckpt.latest_checkpoint(d) == path == it2 and "latest now names iter_0000002" in (
        warnings[-1])
    os.remove(os.path.join(it2, "rng", "rank_00000.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint .*rank_00000.pt is "
                       "missing"):
        ckpt._choose(d, None, strict=False)


def test_directory_lock(tmp_path, caplog):
    d = str(tmp_path / "ck")
    lock = ckpt._acquire(d)
    held = json.load(open(os.path.join(d, "lock.json")))
    assert held["pid"] == os.getpid() and held["host"] and held["time"]
    lock.release()
    assert not os.path.exists(os.path.join(d, "lock.json"))

    def hold(**owner):
        with open(os.path.join(d, "lock.json"), "w") as f:
            json.dump({**held, **owner}, f)

    hold(pid=os.getppid())  # a live process on this host: another job
    with pytest.raises(ckpt.CheckpointError, match=f"in use by another job: .* held by pid "
                       f"{os.getppid()} .* delete .*lock.json"):
        ckpt._acquire(d)
    hold(host="elsewhere")  # liveness unknowable
    with pytest.raises(ckpt.CheckpointError, match="held by pid .* on elsewhere"):
        ckpt._acquire(d)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold(pid=dead.pid)
    with caplog.at_level(logging.WARNING):
        lock = ckpt._acquire(d)
    assert f"its process {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.load(open(os.path.join(d, "lock.json")))["pid"] == os.getpid()
    hold(pid=os.getppid())
    lock.release()  # not ours any more: left alone
    assert os.path.exists(os.path.join(d, "lock.json"))
    open(os.path.join(d, "lock.json"), "w").close()  # being written by another job right now
    with pytest.raises(ckpt.CheckpointError, match="in use by another job"):
        ckpt._acquire(d)
    os.utime(os.path.join(d, "lock.json"), (0, 0))  # ... or left half-written long ago
    ckpt._acquire(d).release()


def test_a_second_job_on_a_directory_stops_with_the_holder_named(shared, tmp_path):
    d = str(tmp_path / "ck")
    os.makedirs(d)
    with open(os.path.join(d, "lock.json"), "w") as f:  # this test process: a live other job
        json.dump({"host": __import__("socket").gethostname(), "pid": os.getpid(),
                   "time": "2026-01-01T00:00:00+00:00", "job": None}, f)
    with pytest.raises(MultiRankError, match=f"in use by another job: .* pid {os.getpid()}"):
        run_multirank(train_body, 1, args=(shared.overrides(d),))


def api_body(rank, world_size, overrides, root):
    """save_checkpoint into a fresh and into an existing iteration, then RNG restore/re-seed."""
    import random

    from megatron_a1.configs import load_config
    from megatron_a1.runtime import destroy, initialize, seed_everything
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.engine import setup_ddp_and_optimizer
    from megatron_a1.training.loop import _optimizer_config
    from megatron_a1.training.model_setup import build_model_chunks

    cfg = load_config(TrainConfig, None, overrides)
    rt = initialize(cfg.parallel, seed=cfg.train.seed)
    model, _ = build_model_chunks(cfg, rt)
    ddp, optimizer = setup_ddp_and_optimizer(model, _optimizer_config(cfg))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("megatron.core").addHandler(handler)
    state = ckpt.TrainerState(iteration=5)
    for _ in range(2):  # the second save replaces iter_0000005
        path = ckpt.save_checkpoint(root, ddp, None, state)
    logging.getLogger("megatron.core").removeHandler(handler)
    after_save = (torch.rand(3), random.random())
    ckpt.load_checkpoint(path, ddp, optimizer, seed=7)
    restored = (torch.rand(3), random.random())
    ckpt.load_checkpoint(path, ddp, optimizer, seed=7, load_rng=False)
    reseeded = (torch.rand(3), random.random())
    seed_everything(7 + 5)
    expected = (torch.rand(3), random.random())
    destroy()
    return {"warnings": [r.getMessage() for r in records], "after_save": after_save,
            "restored": restored, "reseeded": reseeded, "expected": expected,
            "problem": ckpt.checkpoint_problem(path),
            "manifest": json.load(open(os.path.join(path, "manifest.json")))["files"]}


def test_save_is_quiet_and_rng_is_restored_or_reseeded(shared, tmp_path):
    d = str(tmp_path / "ck")
    [out] = run_multirank(api_body, 1, args=(shared.overrides(d), d))
    assert not any("Overwriting" in w for w in out["warnings"]), out["warnings"]
    assert torch.equal(out["restored"][0], out["after_save"][0])
    assert out["restored"][1] == out["after_save"][1]
    assert torch.equal(out["reseeded"][0], out["expected"][0])
    assert out["reseeded"][1] == out["expected"][1]
    assert out["problem"] is None
    assert {"trainer_state.pt", "rng/rank_00000.pt", "metadata.json"} <= set(out["manifest"])
    assert sorted(os.listdir(d)) == ["iter_0000005", "latest"]
