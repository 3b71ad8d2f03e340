"""Trajectory data: rendering, loss masks, indexed datasets, packing and loading.

Modules (one job each):

* :mod:`.tokenizer` — ``load_tokenizer(spec)``: Qwen3.5 tiktoken vocabulary (``"qwen"`` or a
  ``.tiktoken`` file), HF ``tokenizer.json`` / model dir, SentencePiece ``.model``; ids, char
  offsets and span masks;
* :mod:`.records` — parse and validate trajectory JSONL records (one reason per bad record);
* :mod:`.render` — native Qwen3.5 chat-template rendering with exact loss masks
  (``render``, ``render_prompt``, ``render_tool_responses``);
* :mod:`.indexed` — Megatron indexed dataset outputs (tokens, loss mask, metadata, vocabulary),
  published whole, and their reader;
* :mod:`.preprocess` — the multi-process JSONL -> dataset pipeline, its report and failures;
* :mod:`.packing` — deterministic first-fit-decreasing packing into ``max_seq_len``;
* :mod:`.dataset` — packed/blended datasets, DP-sharded resumable loader, THD collation.

Import the submodules directly; this package imports nothing heavy on its own.
"""
