"""Benchmark generation/training overlap: one online GRPO run per ``rollout.max_staleness``.

With staleness 0 the trainer waits while each step's rollouts are sampled; with k > 0 a
background thread samples the next k steps while the current one trains. Same config, same
seeds, one run each:

    python tools/bench_rollout_overlap.py --smoke               # CPU: tiny_test policy, 4 steps
    python tools/bench_rollout_overlap.py --config MY_GRPO.yaml --staleness 0 1 2 --nproc 8 \\
        rollout.url=http://rollout-node:8000   # 8 trainer GPUs, the policy served elsewhere

Columns: ``ms`` = wall time per step (the whole run, start-up included, over its steps);
``wait s`` = the trainer idle for rollouts (sum of ``rollout/wait_seconds``); ``gen s`` =
generation time (sum of ``rollout/seconds``); ``staleness`` = the largest lag seen;
``reward`` = mean reward of the last step. Overlap pays when generation and training use
different devices (a rollout server, or GPUs beside a CPU-bound agent loop); on a 2-core CPU
both compete for the same cores, so the smoke figures show the mechanism, not the gain.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMOKE = [
    "model.preset=tiny_test", "model.backend=local",
    "model.overrides={vocab_size: 248320, router_aux_loss_coef: 0.0}", "model.init_from=null",
    "data.max_seq_len=256", "train.stage=grpo", "train.train_steps=4", "optim.lr=1e-2",
    "optim.decay_style=constant", "grpo.kl_coef=0", "grpo.prompts_per_step=2",
    "grpo.chunk_size=256", "rollout.engine=embedded",
    "rollout.tasks={instruction: examples/tasks/grpo_demo.jsonl}", "rollout.samples_per_prompt=4",
    "rollout.enable_thinking=false", "rollout.max_turns=1", "rollout.max_turn_tokens=8",
    "rollout.max_tokens=8", "rollout.context_limit=256", "rollout.top_k=8",
    "rollout.max_refill_rounds=0",
]


def run_one(args, staleness: int, out: str) -> tuple[float, list[dict]]:
    """Wall seconds and the metrics records of one training run."""
    over = list(args.overrides) + [
        f"rollout.max_staleness={staleness}", f"checkpoint.dir={out}/ck",
        "checkpoint.keep_last=0", f"logging.metrics_jsonl={out}/metrics.jsonl",
        f"rollout.output={out}/rollouts.jsonl", "logging.tensorboard_dir=null"]
    config = args.config
    if args.smoke:  # the CPU demo's GRPO config, shrunk
        config, over = config or "examples/configs/grpo_tiny_cpu.yaml", SMOKE + over
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
              if args.nproc > 1 else [sys.executable, "-m"])
    cmd = launch + ["megatron_a1.train", "--config", config] + over
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"max_staleness={staleness} failed: {last}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return wall, [json.loads(line) for line in f]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run (tiny_test, 4 steps)")
    ap.add_argument("--config", help="an online GRPO/OPD config (rollout.tasks set)")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) per run")
    ap.add_argument("--csv", help="append the rows to this CSV")
    ap.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = ap.parse_args()
    if not (args.smoke or args.config):
        ap.error("give --config (or --smoke)")

    from megatron_a1.benchmarking import Bench, Row

    bench = Bench("rollout overlap (online GRPO)", smoke=args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.staleness:
            case = {"config": os.path.basename(args.config or "smoke"), "ranks": args.nproc}
            try:
                wall, records = run_one(args, k, os.path.join(tmp, f"k{k}"))
            except RuntimeError as exc:
                bench.rows.append(Row(f"max_staleness={k}", case, None, None, error=str(exc)))
                continue
            last = records[-1]
            reward = next((v for key, v in last.items() if key.endswith("/reward")
                           and key.startswith("rollout/")), None)
            bench.rows.append(Row(f"max_staleness={k}", case, 1e3 * wall / len(records), None, {
                "wait s": sum(r.get("rollout/wait_seconds", 0.0) for r in records),
                "gen s": sum(r.get("rollout/seconds", 0.0) for r in records),
                "staleness": max(r.get("rollout/staleness", 0) for r in records),
                "reward": reward}))
    bench.report(csv_path=args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
