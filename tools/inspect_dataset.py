"""Print documents of a preprocessed dataset with the trained (loss-masked-in) spans highlighted.

    python tools/inspect_dataset.py out/sft                 # summary + first document
    python tools/inspect_dataset.py out/sft --index 3 5     # documents 3 and 5
    python tools/inspect_dataset.py out/sft --plain         # [[trained]] instead of colour

Reads PREFIX.bin/.idx, PREFIX.loss_mask.bin/.idx and PREFIX.meta.jsonl through megatron-core's
IndexedDataset; tokens are decoded one span at a time (a span = consecutive tokens with the same
mask), so the highlighting shows exactly which tokens carry loss.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from megatron_a1.data.indexed import DocumentStore
from megatron_a1.data.tokenizer import load_tokenizer

GREEN, RESET = "\033[42;30m", "\033[0m"


def spans(mask: np.ndarray):
    """``(start, end, value)`` runs of equal mask values."""
    if len(mask) == 0:
        return
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = np.concatenate([[0], cuts, [len(mask)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(a), int(b), int(mask[a])


def render_document(tokens, mask, tokenizer, plain: bool) -> str:
    out = []
    for a, b, value in spans(np.asarray(mask)):
        text = tokenizer.decode(tokens[a:b])
        if value:
            out.append(f"[[{text}]]" if plain else f"{GREEN}{text}{RESET}")
        else:
            out.append(text)
    return "".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix")
    p.add_argument("--index", type=int, nargs="*", default=[0], help="document indices")
    p.add_argument("--tokenizer", default="qwen")
    p.add_argument("--plain", action="store_true", help="mark trained spans with [[...]]")
    a = p.parse_args(argv)
    store = DocumentStore(a.prefix)
    tok = load_tokenizer(a.tokenizer)
    lengths = store.lengths
    print(f"{a.prefix}: {len(store)} documents, {int(lengths.sum()):,} tokens "
          f"(mean {lengths.mean():.0f}, max {lengths.max()})")
    for i in a.index:
        if not 0 <= i < len(store):
            print(f"no document {i}", file=sys.stderr)
            return 1
        tokens, mask = store.tokens(i), store.loss_mask(i)
        m = store.meta[i]
        print(f"\n=== document {i}: {len(tokens)} tokens, {int(mask.sum())} trained; "
              f"domain={m['domain']} id={m['id']} source={m['source']}:{m['line']} ===")
        print(render_document(tokens.tolist(), mask, tok, a.plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
