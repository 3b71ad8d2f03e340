"""The training config: one typed tree, loaded from YAML with dotted overrides.

    python -m megatron_a1.train --config examples/configs/sft_tiny_cpu.yaml optim.lr=3e-4

:func:`TrainConfig.validate` checks everything that can be checked before any process group
exists (the layout against the world size and the model, batch arithmetic, stage sections,
datasets, paths); in a dry run what only this machine lacks (paths, a GPU) is a warning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_a1.configs import ConfigError
from megatron_a1.model.backends import transformer_engine_available
from megatron_a1.runtime import ParallelConfig, ParallelLayoutError
from megatron_a1.training.losses import GRPOLossConfig
from megatron_a1.training.online import RolloutSection
from megatron_a1.training.preflight import dataset_problem, model_layout_problems


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"
    """Model preset name (``python -m megatron_a1.model.config --list``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Preset fields to change, e.g. ``{num_layers: 8}``."""
    backend: Literal["auto", "te", "local"] = "auto"
    """Layer implementations: Transformer Engine when available (auto), or local modules."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (megatron-core ``recompute_granularity``)."""
    bf16: bool = False
    """bf16 weights/activations with fp32 main weights in the optimizer (GPU runs)."""
    init_from: str | None = None
    """A checkpoint directory (iter_* or a dir with ``latest``) to take the initial weights from."""


@dataclass(kw_only=True)
class DataSection:
    prefixes: list[str] = field(default_factory=list)
    """Preprocessed dataset prefixes (``tools/preprocess_trajectories.py --output-prefix``)."""
    weights: list[float] | None = None
    """Blend weights per prefix (None: proportional to size)."""
    max_seq_len: int = 4096
    """Tokens per packed sequence."""
    seed: int = 1234
    """Packing shuffle seed."""
    num_workers: int = 0
    """DataLoader workers per rank."""


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warmup (megatron-core ``OptimizerParamScheduler``)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    distributed: bool = True
    """megatron-core's distributed optimizer (optimizer state sharded over DP)."""


@dataclass(kw_only=True)
class TrainSection:
    stage: Literal["sft", "opd", "grpo"] = "sft"
    """Which stage's loss and inputs (DESIGN.md §1)."""
    global_batch_size: int = 16
    """Packed sequences per optimizer step (across DP ranks and micro-batches); with online OPD
    rollouts, prompts per step (GRPO: ``grpo.prompts_per_step``)."""
    micro_batch_size: int = 1
    """Packed sequences per forward pass on one rank."""
    train_steps: int | None = None
    """Optimizer steps; None: one epoch of the data (global samples / global batch)."""
    epochs: float = 1.0
    """Epochs when ``train_steps`` is None."""
    seed: int = 1234
    """Seed of every RNG (model init, data order)."""
    exit_interval: int | None = None
    """Checkpoint and exit when the step count is a multiple of this (Megatron-LM's
    ``--exit-interval``: split a run over jobs with a time limit; the next job resumes)."""
    max_consecutive_nonfinite: int = 3
    """Stop the run after this many NaN/Inf steps in a row (each one is skipped and logged)."""


@dataclass(kw_only=True)
class CheckpointSection:
    dir: str | None = None
    """Where checkpoints go (None: no checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    resume: bool = True
    """Resume from ``dir/latest`` when it exists (an incomplete or corrupt one: see
    ``strict_load``)."""
    load_iteration: int | None = None
    """Resume from ``dir/iter_<load_iteration>`` instead of the newest checkpoint (newer ones
    are overwritten as training reaches their iterations)."""
    load_optimizer: bool = True
    """False: resume the weights and the data position only, with a fresh optimizer (no Adam
    moments) and a fresh learning-rate schedule (warmup again)."""
    load_rng: bool = True
    """Restore each rank's RNG states (only possible under the layout that saved them); False:
    re-seed every rank from ``train.seed + iteration``."""
    strict_load: bool = False
    """An incomplete or corrupt newest checkpoint is an error; False: warn, naming the bad
    file, and resume from the newest complete older one."""
    reshardable_optimizer: bool = True
    """Save the distributed optimizer's state so that any TP/PP/EP/DP layout can resume it
    (megatron-core ``fully_reshardable``: gathers each data-parallel group's state in host
    memory while saving); False: ``dp_reshardable`` (no gather, resumes only under the same
    TP/PP/EP)."""


@dataclass(kw_only=True)
class LoggingSection:
    log_interval: int = 1
    """Console/TensorBoard line every N steps."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (None: off)."""
    wandb_project: str | None = None
    """Weights & Biases project (None: off; needs `pip install wandb`)."""
    metrics_jsonl: str | None = None
    """Append one JSON line of metrics per step here (rank 0)."""


@dataclass(kw_only=True)
class SFTSection:
    fused_loss: bool = True
    """Fused linear cross-entropy (``a1_kernels.cross_entropy``): the loss is computed chunk by
    chunk from the final hidden states and the output-layer weight, so the [T, V] logits (and
    their gradient) never exist. False: megatron-core's output layer + vocab-parallel
    cross-entropy on full logits."""
    chunk_size: int = 4096
    """Tokens per chunk of the fused loss (memory ~ chunk_size x V / TP logits)."""


@dataclass(kw_only=True)
class OPDSection:
    teachers: dict[str, str] = field(default_factory=dict)
    """Domain → teacher checkpoint directory; each sample is scored by its domain's teacher."""
    teacher_topk: dict[str, str] = field(default_factory=dict)
    """Domain → precomputed teacher top-k store (``tools/precompute_teacher_topk.py``), for a
    teacher that does not fit beside the student."""
    teacher_servers: dict[str, str] = field(default_factory=dict)
    """Domain → base URL of a vLLM/SGLang server of the teacher (e.g. ``http://node3:8100``),
    asked each step for its top-``topk`` prompt log-probs on the step's rollouts
    (``examples/serving/vllm_opd_teacher.sh``). The teacher needs the student's tokenizer; it
    need not fit beside the student nor share its architecture. A domain has one teacher: it
    is in exactly one of ``teachers``, ``teacher_topk`` and ``teacher_servers``."""
    teacher_server_backend: Literal["vllm", "sglang"] = "vllm"
    """Protocol of the ``teacher_servers``: vLLM ``/v1/completions`` ``prompt_logprobs`` or
    SGLang ``/generate`` ``input_top_logprobs`` (``megatron_a1/rollout/http.py``)."""
    topk: int = 64
    """Salient-set size of the SVA loss."""
    chunk_size: int = 4096
    """Tokens per chunk in the fused LM-head + SVA loss."""
    real_vocab_size: int | None = None
    """Tokenizer vocabulary (e.g. 248,077 for Qwen3.5): padded rows above it are never salient."""


@dataclass(kw_only=True)
class GRPOSection(GRPOLossConfig):
    rollouts: str | None = None
    """Rollout-group JSONL (offline GRPO; :mod:`megatron_a1.training.rollout_groups`)."""
    prompts_per_step: int = 32
    """Groups (prompts) per optimizer step after dynamic sampling; all their samples train."""
    tokenizer: str | None = None
    """Tokenizer spec, needed only for records that carry ``messages`` but no ``tokens``."""
    chunk_size: int = 4096
    """Positions per chunk of the LM head when computing log-probs and entropy."""
    reference: str | None = None
    """Checkpoint of the frozen reference policy for the KL term (None: the initial weights)."""
    asymmetric_process_weight: float | None = None
    """Tool teacher: A = A_out + w * 1[r_out = 0] * A_proc (None: outcome advantage only)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal."""


@dataclass(kw_only=True)
class TrainConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    sft: SFTSection = field(default_factory=SFTSection)
    opd: OPDSection = field(default_factory=OPDSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)

    def validate(self, world_size: int, *, dry_run: bool = False) -> list[str]:
        """Check everything that can be checked before any process group or model exists.

        Raises :class:`ConfigError` listing every problem found, each naming its config key and
        a fix. What only this machine lacks (a data, checkpoint or task path that is not here, a
        GPU for bf16 or Transformer Engine) fails a real run too; with ``dry_run`` (a cluster
        config checked on a laptop) it is returned as warnings instead.
        """
        errors: list[str] = []
        local: list[str] = []
        try:
            self.parallel.validate_sizes()
            errors += self._model_layout_problems(world_size)
            self.parallel.validate(world_size)
        except ParallelLayoutError as exc:
            errors.append(str(exc))
        else:
            errors += _problems(self._validate_batch, world_size)
        errors += _problems(self._validate_inputs, local)
        if not dry_run:
            errors += local
        if len(errors) > 1:
            raise ConfigError(f"{len(errors)} problems:\n  " + "\n  ".join(errors))
        if errors:
            raise ConfigError(errors[0])
        return local

    def _model_layout_problems(self, world_size: int) -> list[str]:
        from megatron_a1.training.model_setup import resolve_model_config

        try:
            mc = resolve_model_config(self.model)
        except ValueError as exc:  # ConfigError, or a preset field the overrides made invalid
            return [str(exc) if isinstance(exc, ConfigError) else f"model.overrides: {exc}"]
        key = f"model.preset={self.model.preset}" + (" with model.overrides"
                                                     if self.model.overrides else "")
        return model_layout_problems(mc, self.parallel, world_size, model_key=key)

    def _model_vocab_size(self) -> int | None:
        """The model's embedding rows; None when the model section is invalid (an error the
        layout check already reports)."""
        from megatron_a1.training.model_setup import resolve_model_config

        try:
            return resolve_model_config(self.model).vocab_size
        except ValueError:
            return None

    def _validate_batch(self, world_size: int) -> None:
        p, t = self.parallel, self.train
        dp = p.data_parallel(world_size)
        if t.micro_batch_size < 1 or t.global_batch_size < 1:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
        # rollout inputs (GRPO, online OPD) are packed per step and split over DP by the source;
        # the batch arithmetic below is about packed datasets
        packed = t.stage != "grpo" and not self.rollout.tasks
        step = t.micro_batch_size * dp
        if packed and t.global_batch_size % step:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp} = "
                f"world size {world_size} / (tensor_parallel {p.tensor_parallel} x "
                f"pipeline_parallel {p.pipeline_parallel} x context_parallel "
                f"{p.context_parallel})); use train.global_batch_size="
                f"{max(step, t.global_batch_size // step * step)} or another multiple of {step}")
        if packed and p.pipeline_parallel > 1 and t.global_batch_size // step < p.pipeline_parallel:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}): with pipeline_parallel="
                f"{p.pipeline_parallel}, use at least as many micro-batches per step as pipeline "
                f"stages: train.global_batch_size >= {step * p.pipeline_parallel}")

    def _validate_inputs(self, local: list[str]) -> None:
        """Stage sections and input paths; a path missing on this machine goes to ``local``."""
        t = self.train
        online = bool(self.rollout.tasks)
        if online:
            self._validate_rollout(local)
        if self.sft.chunk_size < 1:
            raise ConfigError(f"sft.chunk_size must be >= 1, got {self.sft.chunk_size}")
        ck = self.checkpoint
        if ck.load_iteration is not None and not ck.resume:
            raise ConfigError(f"checkpoint.load_iteration={ck.load_iteration} needs "
                              "checkpoint.resume=true (it picks which checkpoint to resume from)")
        if t.stage == "sft" and online:
            raise ConfigError("rollout.tasks: online rollouts are for train.stage=grpo or opd")
        if t.stage != "grpo" and not online and not self.data.prefixes:
            raise ConfigError("data.prefixes: give at least one preprocessed dataset prefix")
        for p in self.data.prefixes:
            if _here(p + ".idx", local, f"data.prefixes: {p}.idx not found (run "
                     "tools/preprocess_trajectories.py first)"):
                problem = dataset_problem(p, self.data.max_seq_len, self._model_vocab_size())
                if problem:
                    raise ConfigError(problem)
        if self.data.weights is not None and len(self.data.weights) != len(self.data.prefixes):
            raise ConfigError("data.weights: one weight per prefix")
        if t.stage == "opd":
            self._validate_teacher_kinds()
            for domain, path in self.opd.teacher_topk.items():
                if _here(path, local, f"opd.teacher_topk.{domain}: {path} not found (run "
                         "tools/precompute_teacher_topk.py)") and \
                        not os.path.isfile(os.path.join(path, "manifest.json")):
                    raise ConfigError(f"opd.teacher_topk.{domain}: {path} is not a top-k store "
                                      "(run tools/precompute_teacher_topk.py)")
            if self.parallel.pipeline_parallel > 1:
                raise ConfigError("train.stage=opd does not support pipeline parallelism yet "
                                  "(teachers and the fused SVA head need the last stage's "
                                  "hidden states); use parallel.pipeline_parallel=1")
            for domain, path in self.opd.teachers.items():
                if _here(path, local, f"opd.teachers.{domain}: checkpoint {path} not found") \
                        and not os.path.isdir(path):
                    raise ConfigError(f"opd.teachers.{domain}: {path} is not a checkpoint "
                                      "directory")
        if t.stage == "grpo":
            self._validate_grpo(local)
        if (self.checkpoint.save_interval or t.exit_interval) and not self.checkpoint.dir:
            raise ConfigError("checkpoint.save_interval and train.exit_interval need checkpoint.dir")
        m = self.model
        if m.init_from and _here(m.init_from, local, f"model.init_from: checkpoint {m.init_from} "
                                 "not found") and not os.path.isdir(m.init_from):
            raise ConfigError(f"model.init_from: {m.init_from} is not a checkpoint directory")
        if m.bf16 and not _cuda():
            local.append("model.bf16: needs a GPU and this machine has none; set "
                         "model.bf16=false to run on CPU")
        if m.backend == "te" and not transformer_engine_available():
            local.append("model.backend=te: needs Transformer Engine and a GPU, which this "
                         "machine lacks; use model.backend=auto (or local)")

    def _validate_teacher_kinds(self) -> None:
        """Every domain has exactly one teacher: co-located, precomputed or served."""
        o = self.opd
        kinds = {"teachers": o.teachers, "teacher_topk": o.teacher_topk,
                 "teacher_servers": o.teacher_servers}
        if not any(kinds.values()):
            raise ConfigError("opd.teachers: map each domain to a teacher checkpoint (or to a "
                              "precomputed top-k store in opd.teacher_topk, or to a teacher "
                              "server's URL in opd.teacher_servers)")
        seen: dict[str, str] = {}
        for kind, by_domain in kinds.items():
            for domain in sorted(by_domain):
                if domain in seen:
                    raise ConfigError(f"opd.{kind}: domain {domain!r} is also in "
                                      f"opd.{seen[domain]}; a domain has one teacher")
                seen[domain] = kind
        for domain, url in o.teacher_servers.items():
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"opd.teacher_servers.{domain}: give the teacher server's base "
                                  f"URL (http://host:port), got {url!r}")

    def _validate_grpo(self, local: list[str]) -> None:
        g = self.grpo
        if not g.rollouts and not self.rollout.tasks:
            raise ConfigError("grpo.rollouts: give the rollout-group JSONL to train on, or "
                              "rollout.tasks to generate rollouts online")
        if g.rollouts and self.rollout.tasks:
            raise ConfigError("grpo.rollouts and rollout.tasks: choose offline or online rollouts")
        if g.rollouts and _here(g.rollouts, local, f"grpo.rollouts: {g.rollouts} not found") \
                and not os.path.isfile(g.rollouts):
            raise ConfigError(f"grpo.rollouts: {g.rollouts} is not a file")
        if self.parallel.pipeline_parallel > 1:
            raise ConfigError("train.stage=grpo does not support pipeline parallelism yet "
                              "(log-probs need the last stage's hidden states); use "
                              "parallel.pipeline_parallel=1")
        if g.prompts_per_step < 1:
            raise ConfigError("grpo.prompts_per_step must be >= 1")
        if not 0 <= g.clip_low < 1 or g.clip_high < 0:
            raise ConfigError("grpo.clip_low must be in [0, 1) and grpo.clip_high >= 0")
        if g.kl_coef and not (g.reference or self.model.init_from):
            raise ConfigError("grpo.kl_coef > 0 needs a reference policy: set grpo.reference or "
                              "model.init_from (or grpo.kl_coef=0)")
        if g.reference and _here(g.reference, local, f"grpo.reference: checkpoint {g.reference} "
                                 "not found") and not os.path.isdir(g.reference):
            raise ConfigError(f"grpo.reference: {g.reference} is not a checkpoint directory")

    def _validate_rollout(self, local: list[str]) -> None:
        r, p = self.rollout, self.parallel
        if r.engine == "embedded" and max(p.tensor_parallel, p.pipeline_parallel,
                                          p.expert_parallel, p.context_parallel) > 1:
            raise ConfigError("rollout.engine=embedded samples from each rank's whole model: use "
                              "tensor/pipeline/expert/context parallel 1 (data parallel is fine), "
                              "or serve the policy with rollout.engine=vllm|sglang")
        if r.engine != "embedded" and not r.url:
            raise ConfigError(f"rollout.url: rollout.engine={r.engine} needs the server URL")
        if r.engine != "embedded" and not self.checkpoint.dir:
            raise ConfigError(f"checkpoint.dir: rollout.engine={r.engine} syncs weights through "
                              "checkpoints (and their HF export); set checkpoint.dir")
        if r.sync_interval < 1:
            raise ConfigError("rollout.sync_interval must be >= 1")
        if r.max_staleness < 0:
            raise ConfigError("rollout.max_staleness must be >= 0 (0: sample each step with the "
                              "newest weights)")
        if r.weight_transfer == "distributed":
            if r.engine != "sglang":
                raise ConfigError("rollout.weight_transfer=distributed broadcasts to SGLang "
                                  "(update_weights_from_distributed); vLLM servers take "
                                  "rollout.weight_transfer=disk")
            keep = self.checkpoint.keep_last
            if 0 < keep < r.max_staleness + 2:
                raise ConfigError(f"checkpoint.keep_last={keep}: the distributed weight transfer "
                                  "streams a checkpoint up to rollout.max_staleness steps after it "
                                  f"is written; keep at least {r.max_staleness + 2} (or 0: all)")
        for domain, path in r.tasks.items():
            if path != "bundled" and _here(path, local, f"rollout.tasks.{domain}: {path} not "
                                           "found (or use 'bundled')") and not os.path.isfile(path):
                raise ConfigError(f"rollout.tasks.{domain}: {path} is not a task file")
        if r.samples_per_prompt < 1:
            raise ConfigError("rollout.samples_per_prompt must be >= 1")
        if self.train.stage == "opd":
            o = self.opd
            missing = set(r.tasks) - set(o.teachers) - set(o.teacher_topk) - set(o.teacher_servers)
            if missing:
                raise ConfigError(f"rollout.tasks: domains {sorted(missing)} have no teacher in "
                                  "opd.teachers, opd.teacher_topk or opd.teacher_servers")


def _problems(check, *args) -> list[str]:
    """The problem ``check(*args)`` raises, as a list (empty: none)."""
    try:
        check(*args)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _here(path: str, local: list[str], missing: str) -> bool:
    """Whether ``path`` exists on this machine; if not, note ``missing`` in ``local``."""
    if os.path.exists(path):
        return True
    local.append(missing)
    return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
