"""Train Agents-A1: SFT, on-policy distillation (SVA) or GRPO, from one YAML config.

    torchrun --nproc-per-node 8 -m megatron_a1.train --config examples/configs/sft_35b_a3b.yaml
    python -m megatron_a1.train --config examples/configs/sft_tiny_cpu.yaml train.train_steps=20

Overrides are dotted ``key=value`` pairs (values parsed as YAML). The config is loaded and
validated (unknown keys, wrong types, impossible parallel layouts, missing data) before any
process group or model exists.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from megatron_a1.configs import ConfigError, load_config
from megatron_a1.training.config import TrainConfig


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_a1.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training config (see examples/configs)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    ap.add_argument("--dry-run", action="store_true",
                    help="load and validate the config, print it, and exit")
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                    help="ranks to validate the layout against (default: $WORLD_SIZE or 1; set "
                         "it with --dry-run to check a cluster config on a laptop)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # megatron-core announces every fallback it takes without Transformer Engine/Apex (expected
    # on CPU) and every deprecation; keep the console for the training log
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_a1").setLevel(logging.INFO)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        cfg.validate(args.world_size)
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        import yaml

        from megatron_a1.configs import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from megatron_a1.training.loop import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
