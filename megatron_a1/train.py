"""Train Agents-A1: SFT, on-policy distillation (SVA) or GRPO, from one YAML config.

    torchrun --nproc-per-node 8 -m megatron_a1.train --config examples/configs/sft_35b_a3b.yaml
    python -m megatron_a1.train --config examples/configs/sft_tiny_cpu.yaml train.train_steps=20

Overrides are dotted ``key=value`` pairs (values parsed as YAML), anywhere on the command line.
The config is loaded and validated (unknown keys, wrong types, layouts megatron-core would refuse,
missing or empty data) before any process group or model exists. ``--dry-run`` checks a cluster
config on a laptop: what only this machine lacks (data, checkpoints, a GPU) is a warning there.

Exit status: 0 done, 2 config error, 3 stopped after ``train.max_consecutive_nonfinite``
non-finite steps in a row, 4 checkpoint error (``checkpoint.dir`` held by another job, no usable
checkpoint to resume from).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from megatron_a1.configs import ConfigError, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_a1.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training config (see examples/configs)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides anywhere on the line, e.g. optim.lr=3e-4")
    ap.add_argument("--dry-run", action="store_true",
                    help="load and validate the config, print it with the parameters and "
                         "memory per rank (megatron_a1.training.memory), and exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="with --dry-run: ranks to check the layout against (default: "
                         "$WORLD_SIZE, else the smallest world size the layout fits); a real run "
                         "takes torchrun's $WORLD_SIZE")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0,
                    help="with --dry-run: GPU memory per rank the memory estimate is checked "
                         "against, in GiB as GPUs are sold (default: 80, an H100 80GB)")
    ap.add_argument("--json", action="store_true",
                    help="with --dry-run: print the report as one JSON object instead of the "
                         "config and a table")
    return ap.parse_intermixed_args(argv)


def world_size_of(args, cfg) -> int:
    """The world size to validate against: torchrun's for a real run, the asked (or smallest
    fitting) one for a dry run; ConfigError when a real run is asked for another."""
    env = os.environ.get("WORLD_SIZE")
    if not args.dry_run:
        world = int(env or 1)
        if args.world_size is not None and args.world_size != world:
            raise ConfigError(f"--world-size {args.world_size} is for --dry-run; this run has "
                              f"WORLD_SIZE={world} (torchrun --nproc-per-node/--nnodes set it)")
        return world
    if args.world_size is not None:
        return args.world_size
    if env:
        return int(env)
    world = cfg.parallel.smallest_world_size()
    print(f"dry run: checking the layout on {world} rank{'s' if world > 1 else ''}, the smallest "
          "world size it fits (--world-size N for another)", file=sys.stderr)
    return world


def dry_run(cfg, args) -> int:
    """The config, then parameters, derived DP sizes and memory per rank against the GPU."""
    import json

    import yaml

    from megatron_a1.configs import to_dict
    from megatron_a1.training.dry_run import build_report, format_report

    report = build_report(cfg, args.world_size, gpu_memory_gb=args.gpu_memory_gb)
    if args.json:
        print(json.dumps(report))
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(format_report(report))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    # megatron-core announces every fallback it takes without Transformer Engine/Apex (expected
    # on CPU) and every deprecation; keep the console for the training log
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_a1").setLevel(logging.INFO)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime"
    from megatron_a1.training.config import TrainConfig  # imports megatron-core: after the above

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        args.world_size = world_size_of(args, cfg)
        missing_here = cfg.validate(args.world_size, dry_run=args.dry_run)  # only a dry run's
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    for warning in missing_here:
        print(f"config warning: {warning}", file=sys.stderr)
    if args.dry_run:
        return dry_run(cfg, args)
    from megatron_a1.training.checkpoint import CheckpointError
    from megatron_a1.training.loop import NonFiniteLossError, run

    try:
        run(cfg)
    except (NonFiniteLossError, CheckpointError) as exc:  # every rank stops here; one says why
        from megatron_a1.runtime import destroy

        if os.environ.get("RANK", "0") == "0":
            what = "training stopped" if isinstance(exc, NonFiniteLossError) else "checkpoint error"
            print(f"{what}: {exc}", file=sys.stderr, flush=True)
        destroy()  # its barrier: no rank exits (and has the launcher kill the rest) before that
        return 3 if isinstance(exc, NonFiniteLossError) else 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
