"""``python -m megatron_a1.train``: impossible configs fail before any process group exists,
each with its own message (config key and fix); dry runs of the 35B recipes work on a laptop;
overrides go anywhere on the command line; a run that goes non-finite stops with one line.

The table goes through ``main(argv)`` in-process (exit status 2 and the stderr text) with the
tiny CPU config and the 35B recipes at world sizes a user would try (6, 7, 8, 14, 16, 32).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_a1 import train
from test_train_loop import base_overrides, write_dataset

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = os.path.join(ROOT, "examples", "configs")
TINY = os.path.join(CONFIGS, "sft_tiny_cpu.yaml")  # tiny preset: 8 experts, EP=2
SFT35, OPD35, GRPO35 = (os.path.join(CONFIGS, f"{s}_35b_a3b.yaml") for s in ("sft", "opd", "grpo"))


QWEN_VOCAB = 248_077  # the tokenizer TINY's 248,320-row vocabulary pads


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A dataset usable with TINY, one for the tiny_test model (128 ids), one with no documents
    and one whose index is garbage."""
    from megatron_a1.data.indexed import DocumentWriter

    root = tmp_path_factory.mktemp("datasets")
    good = write_dataset(str(root / "good"), n_docs=16, vocab_size=QWEN_VOCAB)
    tiny_test = write_dataset(str(root / "tiny_test"), n_docs=16)
    empty = str(root / "empty")
    DocumentWriter(empty, vocab_size=QWEN_VOCAB).finalize()
    broken = write_dataset(str(root / "broken"), n_docs=4, vocab_size=QWEN_VOCAB)
    with open(broken + ".idx", "wb") as f:
        f.write(b"not an index")
    return {"good": good, "tiny_test": tiny_test, "empty": empty, "broken": broken}


def run_main(capsys, argv):
    capsys.readouterr()
    rc = train.main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def no_launcher_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


# (id, config, command-line arguments besides --config/--dry-run, the message expected)
IMPOSSIBLE = [
    ("experts-over-ep-3", TINY, ["--world-size", "6", "parallel.expert_parallel=3"],
     r"parallel\.expert_parallel=3: the model \(model\.preset=tiny with model\.overrides\) has "
     r"8 experts per MoE layer, which do not split over 3 .*use a divisor of 8: 1, 2, 4, 8 "
     r"\(1, 2 on 6 ranks\)"),
    ("35b-heads-over-tp-3", SFT35, ["--world-size", "6", "parallel.tensor_parallel=3"],
     r"parallel\.tensor_parallel=3: the model \(model\.preset=agents_a1_35b_a3b\) has 16 "
     r"attention heads, 2 query groups .*16 Gated DeltaNet key heads, 32 Gated DeltaNet value "
     r"heads.*tensor parallel sizes this model allows: 1, 2, 4, 8, 16"),
    ("35b-experts-over-ep-7", SFT35, ["--world-size", "14", "parallel.expert_parallel=7"],
     r"parallel\.expert_parallel=7: the model \(model\.preset=agents_a1_35b_a3b\) has 256 "
     r"experts per MoE layer"),
    ("unknown-preset", SFT35, ["--world-size", "16", "model.preset=qwen3_moe"],
     r"model\.preset: unknown preset 'qwen3_moe'; known: \['agents_a1_35b_a3b', 'tiny', "
     r"'tiny_test'\]"),
    ("35b-etp-null-on-8", SFT35, ["--world-size", "8"],
     r"parallel\.expert_parallel: world size 8 is not divisible by expert_tensor_parallel "
     r"\(null -> defaults to tensor_parallel=2\) x expert_parallel \(8\) x pipeline_parallel "
     r"\(1\) = 16.*use parallel\.expert_parallel=4 .* or parallel\.expert_tensor_parallel=1 or "
     r"a multiple of 16 ranks"),
    ("35b-etp-explicit-on-16", SFT35, ["--world-size", "16", "parallel.expert_tensor_parallel=4"],
     r"not divisible by expert_tensor_parallel \(4\) x expert_parallel \(8\)"),
    ("tiny-on-7", TINY, ["--world-size", "7"],
     r"world size 7 is not divisible by expert_tensor_parallel \(null -> defaults to "
     r"tensor_parallel=1\) x expert_parallel \(2\)"),
    ("35b-on-7", SFT35, ["--world-size", "7"],
     r"parallel\.tensor_parallel/pipeline_parallel/context_parallel: world size 7 is not "
     r"divisible by tensor_parallel \(2\) x pipeline_parallel \(1\) x context_parallel \(1\) = 2"),
    ("moe-tp-without-sp", TINY, ["--world-size", "4", "parallel.tensor_parallel=2"],
     r"parallel\.sequence_parallel: the model's MoE layers train with tensor_parallel=2 only "
     r"with sequence parallelism.*set parallel\.sequence_parallel=true"),
    ("sp-without-tp", TINY, ["--world-size", "2", "parallel.sequence_parallel=true"],
     r"parallel\.sequence_parallel: needs tensor_parallel > 1"),
    ("gdn-heads-over-tp-4", TINY, ["--world-size", "8", "parallel.tensor_parallel=4",
                                   "parallel.sequence_parallel=true"],
     r"parallel\.tensor_parallel=4: .* has 2 Gated DeltaNet key heads, which megatron-core "
     r"cannot split over 4 .*allows: 1, 2$"),
    ("query-groups-over-tp", SFT35, ["--world-size", "16",
                                     "model.overrides={num_attention_heads: 12, "
                                     "num_key_value_heads: 3}"],
     r"parallel\.tensor_parallel=2: the model \(model\.preset=agents_a1_35b_a3b with "
     r"model\.overrides\) has 3 query groups \(num_key_value_heads"),
    ("vocab-over-tp", TINY, ["--world-size", "4", "parallel.tensor_parallel=2",
                             "parallel.sequence_parallel=true",
                             "model.overrides={vocab_size: 1001}"],
     r"parallel\.tensor_parallel=2: .* has a vocabulary of 1001"),
    ("expert-ffn-over-etp", TINY, ["--world-size", "6", "parallel.expert_tensor_parallel=3"],
     r"parallel\.expert_tensor_parallel=3: it does not divide the experts' FFN of 64"),
    ("layers-over-pp-3", TINY, ["--world-size", "6", "parallel.pipeline_parallel=3"],
     r"parallel\.pipeline_parallel=3: megatron-core's HybridModel splits the layer pattern "
     r"evenly over pipeline stages, and this model's has 8 layers \(4 decoder layers.*use one "
     r"of 1, 2, 4, 8"),
    ("35b-virtual-pipeline", SFT35, ["--world-size", "32", "parallel.pipeline_parallel=2",
                                     "parallel.virtual_pipeline_parallel=2"],
     r"parallel\.virtual_pipeline_parallel=2: .*set parallel\.virtual_pipeline_parallel=null"),
    ("35b-context-parallel", SFT35, ["--world-size", "32", "parallel.context_parallel=2"],
     r"parallel\.context_parallel=2: the trainer does not split packed sequences"),
    ("35b-batch-vs-dp", SFT35, ["--world-size", "32", "train.global_batch_size=20"],
     r"train\.global_batch_size \(20\) must be a multiple of train\.micro_batch_size \(1\) x "
     r"data-parallel size \(16 = world size 32 .*use train\.global_batch_size=16"),
    ("fewer-micro-batches-than-stages", TINY, ["--world-size", "4",
                                               "parallel.pipeline_parallel=2",
                                               "train.global_batch_size=2"],
     r"train\.global_batch_size \(2\): with pipeline_parallel=2, use at least as many "
     r"micro-batches per step as pipeline stages: train\.global_batch_size >= 4"),
    ("empty-dataset", TINY, ["data.prefixes=[{empty}]"],
     r"data\.prefixes: \S+empty holds no documents"),
    ("unreadable-dataset", TINY, ["data.prefixes=[{broken}]"],
     r"data\.prefixes: \S+broken is not a readable preprocessed dataset"),
    ("documents-longer-than-packs", TINY, ["data.prefixes=[{good}]", "data.max_seq_len=16"],
     r"data\.max_seq_len=16: \S+good has documents of up to \d+ tokens.*--max-seq-len 16"),
    ("dataset-of-another-vocabulary", TINY, ["data.prefixes=[{tiny_test}]"],
     r"data\.prefixes: (\S+tiny_test) was tokenised with a vocabulary of 128 ids \(see "
     r"\1\.dataset\.json\), but the model's vocabulary has 248,320 rows .*preprocess the data "
     r"with the model's tokenizer, or set model\.overrides\.vocab_size"),
    ("override-wrong-type", TINY, ["train.micro_batch_size=abc"],
     r"^config error: override train\.micro_batch_size=abc: expected an integer, got 'abc'"),
    ("override-unknown-key", TINY, ["optim.learning_rate=3e-4"],
     r"^config error: override optim\.learning_rate=3e-4: unknown key 'optim\.learning_rate'"),
    ("preset-override-unknown-field", TINY, ["model.overrides={num_layers: 4}"],
     r"model\.overrides: .*num_layers"),
    ("preset-override-invalid", TINY, ["model.overrides={num_experts_per_tok: 1}"],
     r"model\.overrides: num_experts_per_tok=1: must be in \[2, num_experts=8\]"),
    ("world-size-0", TINY, ["--world-size", "0"], r"world size 0: must be a positive integer"),
    ("load-iteration-without-resume", TINY, ["checkpoint.resume=false",
                                             "checkpoint.load_iteration=3"],
     r"checkpoint\.load_iteration=3 needs checkpoint\.resume=true"),
]


@pytest.mark.parametrize("config,args,expected", [c[1:] for c in IMPOSSIBLE],
                         ids=[c[0] for c in IMPOSSIBLE])
def test_impossible_config_fails_with_its_message(capsys, no_launcher_env, datasets, config,
                                                  args, expected):
    import re

    for name, prefix in datasets.items():
        args = [a.replace("{" + name + "}", prefix) for a in args]
    rc, err = run_main(capsys, ["--config", config, "--dry-run"] + args)
    assert rc == 2, err
    assert re.search(expected, err, re.MULTILINE), err
    assert "Traceback" not in err
    assert not torch.distributed.is_initialized()


def test_every_problem_is_reported_at_once(capsys, no_launcher_env):
    rc, err = run_main(capsys, ["--config", TINY, "--dry-run", "--world-size", "6",
                                "parallel.expert_parallel=3"])
    assert rc == 2
    assert "config error: 2 problems:" in err
    assert "parallel.expert_parallel=3: the model" in err  # the experts do not split
    assert "train.global_batch_size (4) must be a multiple" in err  # nor does the batch over DP 6


def test_overrides_go_anywhere_on_the_command_line(capsys, no_launcher_env, datasets):
    args = train.parse_args(["a.b=1", "--config", TINY, "c.d=2", "--dry-run", "e.f=3",
                             "--world-size", "4", "g.h=5"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3", "g.h=5"]
    assert (args.config, args.dry_run, args.world_size) == (TINY, True, 4)
    good = datasets["good"]
    rc, err = run_main(capsys, ["--dry-run", "--world-size", "2", f"data.prefixes=[{good}]",
                                "--config", TINY, "train.global_batch_size=2"])
    assert rc == 0, err
    assert "config warning" not in err  # the dataset is here: nothing this machine lacks


def test_a_real_run_refuses_a_world_size_option(capsys, no_launcher_env):
    rc, err = run_main(capsys, ["--config", TINY, "--world-size", "2"])
    assert rc == 2 and "--world-size 2 is for --dry-run; this run has WORLD_SIZE=1" in err


def test_a_real_run_refuses_a_dataset_of_another_vocabulary(capsys, monkeypatch, no_launcher_env,
                                                           datasets):
    """The vocabulary check is config validation's: a real run stops on it before the training
    loop, so before any process group exists or any dataset is packed."""
    import megatron_a1.training.loop as loop

    def must_not_start(cfg):
        raise AssertionError("validation let a run start on a dataset of another vocabulary")

    monkeypatch.setattr(loop, "run", must_not_start)
    monkeypatch.setenv("WORLD_SIZE", "2")
    prefix = datasets["tiny_test"]
    rc, err = run_main(capsys, ["--config", TINY, f"data.prefixes=[{prefix}]"])
    assert rc == 2
    assert err.startswith(f"config error: data.prefixes: {prefix} was tokenised with a "
                          "vocabulary of 128 ids"), err
    assert not torch.distributed.is_initialized()


LOCAL = {  # what each 35B recipe names that a laptop lacks
    SFT35: ["data.prefixes: /data/agents_a1/sft.idx not found",
            "model.init_from: checkpoint /checkpoints/qwen3_5_35b_a3b_mcore not found"],
    OPD35: ["data.prefixes: /data/agents_a1/rollouts.idx not found",
            *(f"opd.teachers.{d}: checkpoint /checkpoints/teacher_{d} not found"
              for d in ("search", "science", "instruction", "tool")),
            "model.init_from: checkpoint /checkpoints/agents_a1_sft not found"],
    GRPO35: ["rollout.tasks.tool: /data/agents_a1/tool_tasks.jsonl not found",
             "model.init_from: checkpoint /checkpoints/agents_a1_sft not found"],
}
if not torch.cuda.is_available():
    for missing in LOCAL.values():
        missing.append("model.bf16: needs a GPU")


@pytest.mark.parametrize("config,smallest_world", [(SFT35, 16), (OPD35, 32), (GRPO35, 32)],
                         ids=["sft", "opd", "grpo"])
def test_35b_recipe_dry_runs_here_and_a_real_run_refuses(capsys, monkeypatch, no_launcher_env,
                                                         config, smallest_world):
    """No overrides: the dry run warns about what is not here and exits 0; a real run (as
    torchrun would start it on the smallest world) stops on the same points before any process
    group."""
    rc, err = run_main(capsys, ["--config", config, "--dry-run"])
    assert rc == 0, err
    assert (f"checking the layout on {smallest_world} ranks, the smallest world size it fits"
            in err)
    for missing in LOCAL[config]:
        assert err.count(f"config warning: {missing}") == 1, (missing, err)
    assert "config error" not in err

    import megatron_a1.training.loop as loop

    def must_not_start(cfg):
        raise AssertionError("validation let a run start that this machine cannot do")

    monkeypatch.setattr(loop, "run", must_not_start)
    monkeypatch.setenv("WORLD_SIZE", str(smallest_world))
    rc, err = run_main(capsys, ["--config", config])
    assert rc == 2, err
    assert f"config error: {len(LOCAL[config])} problems:" in err
    for missing in LOCAL[config]:
        assert f"\n  {missing}" in err, (missing, err)
    assert not torch.distributed.is_initialized()


def _nonfinite_run(tmp_path, dataset, launcher: list[str], *extra: str):
    config = tmp_path / "run.yaml"
    config.write_text("train: {stage: sft}\n")
    overrides = base_overrides(dataset, str(tmp_path / "ck"), steps=4) + [
        "optim.lr=1e30", "optim.warmup_steps=0", "train.max_consecutive_nonfinite=2",
        "checkpoint.save_interval=0", "train.global_batch_size=2", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(launcher + ["-m", "megatron_a1.train", "--config", str(config)]
                          + overrides, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


STOP = ("training stopped: step 3: 2 non-finite steps in a row (last: loss nan; their updates "
        "were skipped); lower optim.lr (now 1e+30), check the data, or raise "
        "train.max_consecutive_nonfinite (2)")


def test_nonfinite_stop_is_one_line_and_exit_3(tmp_path, datasets):
    """lr 1e30: step 1 is finite and its update blows the weights up; steps 2 and 3 are NaN."""
    proc = _nonfinite_run(tmp_path, datasets["tiny_test"], [sys.executable])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.count("training stopped:") == 1 and STOP in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_nonfinite_stop_on_two_ranks(tmp_path, datasets):
    """Under torchrun (EP=2): rank 0 alone says why, no rank prints a traceback; only the
    launcher reports the exit status 3 (ChildFailedError)."""
    proc = _nonfinite_run(tmp_path, datasets["tiny_test"], [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        "parallel.expert_parallel=2")
    assert proc.returncode != 0
    assert proc.stderr.count("training stopped:") == 1 and STOP in proc.stderr, proc.stderr
    assert "exitcode  : 3" in proc.stderr
    assert "NonFiniteLossError" not in proc.stderr
    assert proc.stderr.count("Traceback") <= 1  # torchrun's own ChildFailedError, if any
