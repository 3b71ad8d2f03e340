"""HF export of training checkpoints of any layout, and the online disk weight sync from EP=2.

A checkpoint saved under EP=2, TP=2 or PP=2 (with its optimizer state) exports to the same
safetensors, bit for bit, as the same weights saved by one rank; the architecture comes from
the run's stored config, the checkpoint root is followed to ``latest``, and every file is
world-readable. The EP=2 online run saves the optimizer in the bucket format (``chained_N.``
keys) and its weights reach the server through the same export.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from megatron_a1.testing import run_multirank
from megatron_a1.training import checkpoint as ckpt
from test_checkpoint_layouts import LAYOUTS, runs
from test_train_loop import train_body
from test_train_online import _serve, _stop, online_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resave_body(rank, world_size, overrides, jobs):
    """Load each ``(src, dst, reshardable)`` checkpoint (model and optimizer) under this run's
    layout and save it again at the same iteration into ``dst``."""
    from megatron_a1.configs import load_config
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.training.config import TrainConfig
    from megatron_a1.training.engine import setup_ddp_and_optimizer
    from megatron_a1.training.loop import _optimizer_config
    from megatron_a1.training.model_setup import build_model_chunks

    cfg = load_config(TrainConfig, None, overrides)
    rt = initialize(cfg.parallel, seed=cfg.train.seed)
    model, _ = build_model_chunks(cfg, rt)
    ddp, optimizer = setup_ddp_and_optimizer(model, _optimizer_config(cfg))
    for src, dst, reshardable in jobs:
        _, state = ckpt.resume(src, ddp, optimizer, seed=0)
        ckpt.save_checkpoint(dst, ddp, optimizer, state, reshardable_optimizer=reshardable)
    destroy()


def export(ckpt_dir: str, out: str) -> dict[str, torch.Tensor]:
    from megatron_a1.model.convert import megatron_to_hf

    megatron_to_hf(ckpt_dir, out, log=lambda *a: None)
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return runs(tmp_path_factory)


def test_export_from_any_layout_equals_the_single_rank_export(shared, tmp_path):
    runs_at_2 = {layout: shared.stopped_at_2(layout) for layout in ("ep2", "tp2", "pp2")}
    saved = {k: os.path.join(d, "iter_0000002") for k, d in runs_at_2.items()}
    one = {layout: str(tmp_path / f"one_{layout}") for layout in saved}
    run_multirank(resave_body, 1, args=(shared.overrides(str(tmp_path / "x")),
                                        [(runs_at_2[k], one[k], True) for k in saved]))
    for layout, path in saved.items():
        assert_same(export(path, str(tmp_path / f"hf_{layout}")),
                    export(one[layout], str(tmp_path / f"hf_one_{layout}")))
    config = json.load(open(tmp_path / "hf_ep2" / "config.json"))
    assert config["vocab_size"] == 128 and config["num_experts"] == 4  # the run's tiny_test


def test_cli_exports_a_training_run_world_readable(shared, tmp_path):
    run_dir = shared.stopped_at_2("ep2")  # the root: `latest` names iter_0000002
    out = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                           "mcore-to-hf", "--mcore", run_dir, "--hf", out],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # no wall of library warnings
    assert_same(load_file(os.path.join(out, "model.safetensors")),
                export(os.path.join(run_dir, "iter_0000002"), str(tmp_path / "direct")))
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    from megatron_a1.model.convert import ConversionError

    with pytest.raises(ConversionError, match="not a dist_checkpointing checkpoint"):
        export(str(tmp_path), str(tmp_path / "x"))


def test_online_disk_weight_sync_from_an_expert_parallel_run(tmp_path):
    """GRPO on 2 ranks with EP=2 against a vLLM-protocol server: after step 1 the server
    reloads the HF export of the step-1 checkpoint, and step 2 samples with it. The run saves
    the optimizer in megatron-core's bucket format, whose keys start ``chained_N.optimizer.``
    with EP (what the exporter once failed on)."""
    from megatron.core import dist_checkpointing

    init = str(tmp_path / "i" / "ck")
    over = [o for o in online_overrides(tmp_path / "i", None, steps=0)
            if not o.startswith("model.init")]
    run_multirank(train_body, 1, args=(over + ["grpo.kl_coef=0"],))
    hf = str(tmp_path / "hf_init")
    start = export(init, hf)  # the architecture: the run's stored config
    root = tmp_path / "run"
    root.mkdir()
    server, url = _serve(hf, open(root / "server.log", "w+"))
    try:
        run_multirank(train_body, 2, args=(online_overrides(root, init, extra=[
            "rollout.engine=vllm", f"rollout.url={url}", "checkpoint.reshardable_optimizer=false",
            *LAYOUTS["ep2"]]),))
        info = json.loads(urllib.request.urlopen(url + "/weight_info", timeout=30).read())
    finally:
        _stop(server)
    assert info.get("weight_version") in (1, "1"), info
    records = [json.loads(line) for line in open(root / "rollouts.jsonl")]
    assert {r["step"]: r["weight_version"]["min"] for r in records} == {1: 0, 2: 1}
    step1_ckpt = os.path.join(root, "ck", "iter_0000001")
    assert any(k.startswith("chained_1.optimizer.")
               for k in dist_checkpointing.load_tensors_metadata(step1_ckpt))
    step1 = load_file(os.path.join(root, "ck", "hf_export", "step_0000001", "model.safetensors"))
    assert_same(step1, export(step1_ckpt, str(tmp_path / "x")))
    assert not torch.equal(step1["lm_head.weight"], start["lm_head.weight"])  # it trained
