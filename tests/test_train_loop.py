"""The training entry point end to end on CPU: layouts agree, resume is exact, configs fail early.

A synthetic packed dataset (a repeating-motif language with ragged documents, vocabulary 128)
feeds the ``tiny_test`` preset (Gated DeltaNet + gated attention + MoE layers).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from megatron_a1.configs import ConfigError, load_config
from megatron_a1.testing import run_multirank
from megatron_a1.training.config import TrainConfig


def write_dataset(prefix: str, n_docs: int = 24, seed: int = 0, vocab_size: int = 128) -> str:
    """Documents of ids below 128, recorded as tokenised with ``vocab_size`` ids (the tiny_test
    model's by default; config validation refuses a model of another vocabulary)."""
    from megatron_a1.data.indexed import DocumentWriter

    rng = np.random.default_rng(seed)
    w = DocumentWriter(prefix, vocab_size=vocab_size)
    for i in range(n_docs):
        length = int(rng.integers(5, 60))
        motif = rng.integers(0, 128, size=int(rng.integers(2, 6)))
        tokens = np.resize(motif, length)
        mask = (rng.random(length) > 0.3).astype(np.uint8)
        w.add(tokens, mask, {"domain": ["search", "tool"][i % 2], "source": "synthetic",
                             "line": i + 1, "id": str(i)})
    w.finalize()
    return prefix


def base_overrides(prefix: str, ckpt_dir: str, steps: int = 4, init: str | None = None) -> list[str]:
    return ([f"model.init_from={init}"] if init else []) + [
        "model.preset=tiny_test", "model.backend=local",
        # the load-balancing loss is computed per micro-batch, so it would differ across DP
        # layouts by design; the layout equivalence is about the parallel machinery
        "model.overrides={router_aux_loss_coef: 0.0}",
        f"data.prefixes=[{prefix}]", "data.max_seq_len=128",
        "train.global_batch_size=4", "train.micro_batch_size=1", f"train.train_steps={steps}",
        "optim.lr=1e-2", "optim.warmup_steps=1", "optim.decay_style=linear",
        f"checkpoint.dir={ckpt_dir}", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
        f"logging.metrics_jsonl={ckpt_dir}/metrics.jsonl",
    ]


def train_body(rank, world_size, overrides):
    from megatron_a1.training.loop import run

    cfg = load_config(TrainConfig, None, overrides)
    cfg.validate(world_size)
    return run(cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data") / "synthetic"))


@pytest.fixture(scope="module")
def init_ckpt(dataset, tmp_path_factory):
    """train_steps=0 writes the initial weights: the common start of every layout (each EP
    rank initialises its own experts, so fresh EP=2 weights differ from one rank's)."""
    ck = str(tmp_path_factory.mktemp("init"))
    run_multirank(train_body, 1, args=(base_overrides(dataset, ck, steps=0),))
    assert os.listdir(ck) and os.path.isdir(os.path.join(ck, "iter_0000000"))
    return ck


@pytest.fixture(scope="module")
def single_rank_run(dataset, init_ckpt, tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("single"))
    [summary] = run_multirank(train_body, 1, args=(base_overrides(dataset, ck, init=init_ckpt),))
    return ck, summary


def test_single_rank_sft_trains(single_rank_run):
    ck, summary = single_rank_run
    losses = summary["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000004", "latest", "metrics.jsonl"]
    rows = [json.loads(line) for line in open(os.path.join(ck, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == losses


@pytest.mark.parametrize("layout", ["parallel.expert_parallel=2", "parallel.tensor_parallel=2",
                                    "parallel.pipeline_parallel=2"])
def test_two_ranks_equal_one_rank(single_rank_run, dataset, init_ckpt, tmp_path, layout):
    """EP=2 (DP=2 for the dense part), TP=2+SP and PP=2 (packs of varying length between the
    stages) train the same losses as one rank."""
    _, ref = single_rank_run
    extra = [layout] + (["parallel.sequence_parallel=true"] if "tensor" in layout else [])
    results = run_multirank(train_body, 2, args=(
        base_overrides(dataset, str(tmp_path), init=init_ckpt) + extra,))
    for summary in results:
        np.testing.assert_allclose(summary["losses"], ref["losses"], rtol=2e-4)


def test_resume_is_exact(single_rank_run, dataset, init_ckpt, tmp_path):
    """Exit after step 2 (checkpoint), start a new process: steps 3-4 equal the uninterrupted run."""
    ck_ref, ref = single_rank_run
    ck = str(tmp_path / "ck")
    run = base_overrides(dataset, ck, 4, init_ckpt)
    [first] = run_multirank(train_body, 1, args=(run + ["train.exit_interval=2"],))
    assert first["losses"] == ref["losses"][:2]
    [second] = run_multirank(train_body, 1, args=(run,))
    assert second["losses"] == ref["losses"][2:], "resumed losses must equal the uninterrupted run"


def test_resume_across_data_parallel_size(single_rank_run, dataset, init_ckpt, tmp_path):
    """Checkpoint at step 2 on one rank, resume on DP=2: same data order, same losses."""
    _, ref = single_rank_run
    ck = str(tmp_path / "ck")
    run = base_overrides(dataset, ck, 4, init_ckpt)
    run_multirank(train_body, 1, args=(run + ["train.exit_interval=2"],))
    results = run_multirank(train_body, 2, args=(run,))
    for summary in results:
        np.testing.assert_allclose(summary["losses"], ref["losses"][2:], rtol=2e-4)


# ------------------------------------------------------------------ config validation (no compute)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(TrainConfig, None, ["optim.learning_rate=1e-4"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="override train.global_batch_size=big: expected an "
                       "integer"):
        load_config(TrainConfig, None, ["train.global_batch_size=big"])
    with pytest.raises(ConfigError, match="override train.stage=pretrain: 'pretrain' is not one of"):
        load_config(TrainConfig, None, ["train.stage=pretrain"])


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-5\n  betas: [0.9, 0.95]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.betas'"):
        load_config(TrainConfig, str(path))


def test_unparsable_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="override 'rollout.tasks={tool:'.*quote"):
        load_config(TrainConfig, None, ["rollout.tasks={tool:", "bundled}"])  # unquoted shell
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1e-5\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(TrainConfig, str(path))


def test_impossible_layouts_fail_before_compute(dataset):
    cfg = load_config(TrainConfig, None, base_overrides(dataset, "/tmp/x") +
                      ["parallel.tensor_parallel=3"])
    with pytest.raises(ConfigError, match="not divisible by tensor_parallel"):
        cfg.validate(world_size=4)
    cfg = load_config(TrainConfig, None, base_overrides(dataset, "/tmp/x") +
                      ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        cfg.validate(world_size=4)
    cfg = load_config(TrainConfig, None, ["data.prefixes=[/nonexistent/prefix]"])
    with pytest.raises(ConfigError, match="prefix.idx not found"):
        cfg.validate(world_size=1)
    cfg = load_config(TrainConfig, None, base_overrides(dataset, "/tmp/x") + ["train.stage=opd"])
    with pytest.raises(ConfigError, match="opd.teachers"):
        cfg.validate(world_size=1)


def test_example_configs_load(dataset):
    """Every shipped example config parses against the schema."""
    root = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert names
    for name in names:
        load_config(TrainConfig, os.path.join(root, name))


def sigterm_after_step_2(rank, world_size, overrides):
    """``train_body``, with SIGTERM delivered to this process right after the second step."""
    import signal

    import megatron_a1.training.loop as loop

    real, calls = loop.train_step, []

    def step_then_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before preempting a job
        return result

    loop.train_step = step_then_signal
    return train_body(rank, world_size, overrides)


def test_sigterm_checkpoints_and_resume_continues(single_rank_run, dataset, init_ckpt, tmp_path):
    """SIGTERM mid-run: the trainer saves a checkpoint and exits; the next run resumes exactly."""
    _, ref = single_rank_run
    ck = str(tmp_path / "ck")
    run = base_overrides(dataset, ck, 4, init_ckpt) + ["checkpoint.save_interval=0"]
    [first] = run_multirank(sigterm_after_step_2, 1, args=(run,))
    assert first["losses"] == ref["losses"][:2]
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000002"
    [second] = run_multirank(train_body, 1, args=(run,))
    assert second["losses"] == ref["losses"][2:]
