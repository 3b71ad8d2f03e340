"""Trajectory data: rendering, loss masks, indexed datasets, packing and loading.

Modules (one job each):

* :mod:`.tokenizer` — ``load_tokenizer(spec)``: Qwen3.5 tiktoken vocabulary (``"qwen"``), HF
  ``tokenizer.json`` / model dir, SentencePiece ``.model``; ids and char offsets;
* :mod:`.records` — parse and validate trajectory JSONL records (one reason per bad record);
* :mod:`.render` — native Qwen3.5 chat-template rendering with exact loss masks
  (``render``, ``render_prompt``, ``render_tool_responses``);
* :mod:`.indexed` — Megatron indexed dataset outputs (tokens, loss mask, metadata) and reader;
* :mod:`.preprocess` — the multiprocessing JSONL -> dataset pipeline and its report;
* :mod:`.packing` — deterministic first-fit-decreasing packing into ``max_seq_len``;
* :mod:`.dataset` — packed/blended datasets, DP-sharded resumable loader, THD collation.

Import the submodules directly; this package imports nothing heavy on its own.
"""
