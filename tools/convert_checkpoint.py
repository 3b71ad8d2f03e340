"""Convert Qwen3.5-MoE checkpoints: Hugging Face safetensors <-> megatron-core dist_checkpointing.

    python tools/convert_checkpoint.py hf-to-mcore --hf Qwen3.5-35B-A3B/ --mcore ckpt/
    python tools/convert_checkpoint.py mcore-to-hf --mcore ckpt/ --hf out/ [--dtype bfloat16]
    python tools/convert_checkpoint.py mcore-to-hf --mcore runs/sft/ --hf out/   # a training run

One process, no GPU needed. The dist_checkpointing checkpoint is layout-free: load it under any
TP/EP/PP layout; a checkpoint saved under any layout converts back. ``--mcore`` may be a
training run's ``checkpoint.dir`` (its ``latest`` is followed) or one ``iter_*`` directory: the
optimizer state is skipped and the architecture is the run's stored model config (unless
``--hf-config``). Output files are world-readable (0644). Tensors stream one at a time
(the weights are never held twice); HF -> Megatron -> HF is bit-exact. Any unmapped, missing or
mis-shaped tensor stops the conversion with an error naming it. The mapping and its limits:
``megatron_a1/model/convert.py``.
"""
from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    sub = ap.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> dist_checkpointing dir")
    a.add_argument("--hf", required=True, help="dir with config.json and *.safetensors (+ index)")
    a.add_argument("--mcore", required=True, help="output checkpoint dir")
    a.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the HF dtype)")
    b = sub.add_parser("mcore-to-hf", help="dist_checkpointing dir -> HF safetensors dir")
    b.add_argument("--mcore", required=True, help="checkpoint dir (any layout): converted, a "
                   "training iter_* dir, or a training checkpoint.dir (follows `latest`)")
    b.add_argument("--hf", required=True, help="output dir")
    b.add_argument("--hf-config", help="config.json of the architecture (default: the one "
                   "recorded by hf-to-mcore, else the training run's model config)")
    b.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the recorded HF dtypes)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = ap.parse_args(argv)

    sys.modules.setdefault("fla", None)  # CPU conversion: never bind fla's GPU kernels
    import json
    import logging
    import warnings

    # megatron-core announces every fallback it takes without Transformer Engine/Apex, and
    # torch.distributed.checkpoint the one-process load: expected here, not news
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(megatron\.core|torch\.distributed\.checkpoint)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    import torch

    from megatron_a1.model import convert
    from megatron_a1.training.checkpoint import CheckpointError

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.direction == "hf-to-mcore":
            cfg = convert.hf_to_megatron(args.hf, args.mcore, dtype=dtype)
        else:
            hf_config = json.load(open(args.hf_config)) if args.hf_config else None
            cfg = convert.megatron_to_hf(args.mcore, args.hf, hf_config=hf_config, dtype=dtype,
                                         max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (convert.ConversionError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {cfg.num_layers}-layer model ({cfg.hybrid_pattern[:16]}...), "
          f"{cfg.num_parameters():,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
