"""Logits parity of our megatron-core model with transformers' Qwen3_5MoeForCausalLM.

    python tools/check_parity.py --hf-model DIR --input-ids IDS.npy [--cu-seqlens CU.npy] \
        --output LOGITS.npy [--atol 1e-4]

Converts the HF checkpoint with the checkpoint converter (into a temporary dist_checkpointing
dir), builds our model from it, runs it on CPU in float32 on the tokens (one packed THD sequence
when --cu-seqlens is given: int array [0, l0, l0+l1, ..., T]), writes our logits (float32
[T, V]) and prints the max absolute difference against transformers run on each document
alone. Exit status 1 when the difference exceeds --atol.
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--hf-model", required=True, help="HF checkpoint dir (config.json + safetensors)")
    ap.add_argument("--input-ids", required=True, help=".npy of token ids, shape [T] (or [1, T])")
    ap.add_argument("--cu-seqlens", help=".npy of document boundaries [0, ..., T] (packed run)")
    ap.add_argument("--output", required=True, help=".npy to write our float32 logits [T, V]")
    ap.add_argument("--atol", type=float, default=1e-4, help="tolerance for the exit status")
    args = ap.parse_args(argv)

    # transformers binds fla's kernels whenever fla imports, and they fail on CPU
    sys.modules["fla"] = None
    sys.modules.setdefault("causal_conv1d", None)
    import os

    os.environ.setdefault("TRITON_INTERPRET", "0")  # core attention: PyTorch path on CPU
    import numpy as np
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    from megatron_a1.model import convert, parity
    from megatron_a1.runtime import destroy, initialize

    ids = torch.from_numpy(np.load(args.input_ids)).long().flatten()
    cu = torch.from_numpy(np.load(args.cu_seqlens)) if args.cu_seqlens else None
    cu = parity.as_cu_seqlens(cu, ids.numel())
    rt = initialize(seed=0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = convert.hf_to_megatron(args.hf_model, tmp, dtype=torch.float32)
            ours = parity.megatron_logits(
                parity.build_from_checkpoint(cfg, tmp, rt.pg_collection, params_dtype=torch.float32),
                ids, cu)
    finally:
        destroy()
    np.save(args.output, ours.numpy())
    hf_model = Qwen3_5MoeForCausalLM.from_pretrained(args.hf_model, dtype=torch.float32).eval()
    ref = parity.hf_logits(hf_model, ids, cu)
    diff = (ours - ref).abs().max().item()
    print(f"tokens {ids.numel()}, documents {cu.numel() - 1}, vocab {ours.shape[1]}: "
          f"max |ours - transformers| = {diff:.3e} (atol {args.atol:g})")
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
