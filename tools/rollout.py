"""Run agent episodes with a generation engine and write token-exact rollout records (JSONL).

    # the tiny model with random weights (CPU), 2 bundled tasks per domain, 4 samples each
    python tools/rollout.py --engine embedded --preset tiny --seed 0 --domains search tool \
        --limit 2 --samples-per-prompt 4 --max-turns 4 --output runs/rollouts.jsonl
    # a trained checkpoint (its model section from the training config)
    python tools/rollout.py --engine embedded --config examples/configs/sft_tiny_cpu.yaml \
        --checkpoint runs/demo/sft/checkpoints --domains tool --output out.jsonl
    # a vLLM / SGLang server, user tasks
    python tools/rollout.py --engine vllm --url http://host:8000 --tasks my_tasks.jsonl \
        --domain tool --samples-per-prompt 8 --temperature 1.0 --output out.jsonl

One record per episode (``megatron_a1.rollout.agent`` documents the fields); the GRPO trainer
(``grpo.rollouts``) and ``tools/preprocess_trajectories.py`` read the file. Prints the per-domain
stats table at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DOMAINS = ("search", "science", "instruction", "tool")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    t = p.add_argument_group("tasks")
    t.add_argument("--domains", nargs="+", default=list(DOMAINS),
                   help="bundled task sets to run (default: all four)")
    t.add_argument("--tasks", help="a task JSONL file instead of the bundled sets (needs --domain)")
    t.add_argument("--domain", help="the environment of --tasks (search|science|instruction|tool "
                   "or a registered one)")
    t.add_argument("--limit", type=int, default=None, help="first N tasks per domain")
    t.add_argument("--samples-per-prompt", type=int, default=1, help="GRPO group size")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=["embedded", "vllm", "sglang"], default="embedded")
    e.add_argument("--url", help="server base URL (vllm/sglang)")
    e.add_argument("--max-in-flight", type=int, default=64, help="concurrent HTTP requests")
    e.add_argument("--config", help="embedded: a training config YAML whose model section to build")
    e.add_argument("--preset", default="tiny", help="embedded: model preset (without --config)")
    e.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="embedded: model config field (repeatable), e.g. hidden_size=64")
    e.add_argument("--checkpoint", help="embedded: checkpoint dir to load weights from "
                   "(default: random weights from --seed)")
    e.add_argument("--tokenizer", default="qwen")
    s = p.add_argument_group("sampling and limits")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--seed", type=int, default=None,
                   help="sampling seed (distinct per sample and turn) and embedded weights' seed")
    s.add_argument("--max-turns", type=int, default=16)
    s.add_argument("--max-tokens", type=int, default=16384, help="sampled tokens per episode")
    s.add_argument("--max-turn-tokens", type=int, default=4096)
    s.add_argument("--context-limit", type=int, default=32768)
    s.add_argument("--no-thinking", action="store_true", help="empty think block in the header")
    p.add_argument("--output", required=True, help="rollout JSONL to write")
    p.add_argument("--stats-json", help="also write the stats as JSON here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.tasks and not a.domain:
        p.error("--tasks needs --domain")
    if a.engine in ("vllm", "sglang") and not a.url:
        p.error(f"--engine {a.engine} needs --url")
    return a


def load_task_sets(a) -> dict[str, list[dict]]:
    from megatron_a1.envs import bundled_tasks, load_tasks

    sets = {a.domain: load_tasks(a.tasks)} if a.tasks else {d: bundled_tasks(d) for d in a.domains}
    return {d: ts[:a.limit] if a.limit is not None else ts for d, ts in sets.items()}


def build_engine(a, tokenizer):
    if a.engine in ("vllm", "sglang"):
        from megatron_a1.rollout.http import HTTPEngine

        return HTTPEngine(a.url, backend=a.engine, max_in_flight=a.max_in_flight)
    return build_embedded_engine(a, tokenizer)


def build_embedded_engine(a, tokenizer):
    """The tiny (or any unsharded) model in this process, random or from a checkpoint."""
    from megatron_a1.model.build import build_model
    from megatron_a1.model.config import preset
    from megatron_a1.rollout.embedded import EmbeddedEngine
    from megatron_a1.runtime import initialize

    backend = "local"
    if a.config:
        from megatron_a1.configs import load_config
        from megatron_a1.training.config import TrainConfig
        from megatron_a1.training.model_setup import resolve_model_config

        tc = load_config(TrainConfig, a.config)
        mc, backend = resolve_model_config(tc.model), tc.model.backend
    else:
        mc = preset(a.preset)
    if a.override:
        import yaml

        mc = mc.replace(**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.override)})
    if mc.vocab_size < tokenizer.vocab_size:
        padded = math.ceil(tokenizer.vocab_size / 256) * 256  # 248,320 for Qwen3.5, as trained
        print(f"rollout: model vocab {mc.vocab_size} < tokenizer's {tokenizer.vocab_size}; "
              f"using vocab_size={padded}", file=sys.stderr)
        mc = mc.replace(vocab_size=padded)
    rt = initialize(seed=a.seed if a.seed is not None else 1234)
    model = build_model(mc, mc.to_transformer_config(None), pg_collection=rt.pg_collection,
                        backend=backend, max_seq_len=a.context_limit)
    if a.checkpoint:
        from megatron_a1.training import checkpoint as ckpt

        ckpt.load_model_weights(ckpt.latest_checkpoint(a.checkpoint) or a.checkpoint, [model])
    return EmbeddedEngine(model.eval(), vocab_size=tokenizer.vocab_size,
                          seed=a.seed if a.seed is not None else 0,
                          max_context=a.context_limit + 1)


def main(argv=None) -> int:
    a = parse_args(argv)
    from tqdm import tqdm

    from megatron_a1.data.tokenizer import load_tokenizer
    from megatron_a1.rollout.agent import AgentConfig, RolloutStats, group_rollouts
    from megatron_a1.rollout.engine import SamplingParams

    tokenizer = load_tokenizer(a.tokenizer)
    task_sets = load_task_sets(a)
    cfg = AgentConfig(max_turns=a.max_turns, max_tokens=a.max_tokens,
                      max_turn_tokens=a.max_turn_tokens, context_limit=a.context_limit,
                      enable_thinking=not a.no_thinking, seed=a.seed,
                      sampling=SamplingParams(temperature=a.temperature, top_p=a.top_p,
                                              top_k=a.top_k))
    engine = build_engine(a, tokenizer)
    total = sum(len(ts) for ts in task_sets.values()) * a.samples_per_prompt
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    stats = RolloutStats()
    start = time.perf_counter()
    with open(a.output, "w", encoding="utf-8") as out, \
            tqdm(total=total, unit="ep", disable=a.no_progress, file=sys.stderr) as bar:
        def on_record(rec: dict) -> None:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            stats.add(rec)
            bar.update(1)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_s=f"{stats.as_dict()['all']['tokens_generated'] / elapsed:,.0f}",
                            refresh=False)

        group_rollouts(engine, task_sets, a.samples_per_prompt, tokenizer, cfg,
                       on_record=on_record)
    stats.seconds = time.perf_counter() - start
    print(stats.table())
    print(f"rollout: {total} episodes in {stats.seconds:.1f}s -> {a.output}", file=sys.stderr)
    if a.stats_json:
        with open(a.stats_json, "w") as f:
            json.dump(stats.as_dict(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
