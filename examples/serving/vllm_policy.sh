#!/usr/bin/env bash
# GPU-CLUSTER RECIPE (not run by CI or the CPU demo): serve the 35B-A3B policy with vLLM on one
# 8-GPU node for GRPO/OPD rollouts. The trainer reaches it with
#     HTTPEngine("http://HOST:8000", backend="vllm")          # megatron_a1/rollout/http.py
# and pushes new weights with VLLMWeightSync (megatron_a1/rollout/weight_sync.py).
#
#   MODEL=/shared/ckpt/policy_hf bash examples/serving/vllm_policy.sh
#
# MODEL is a Hugging Face safetensors dir: the base Qwen3.5-35B-A3B, or our export
# (python tools/convert_checkpoint.py mcore-to-hf --mcore CKPT --hf OUT --dtype bfloat16).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3.5-35B-A3B}
PORT=${PORT:-8000}

# VLLM_SERVER_DEV_MODE=1 mounts the RL control routes the weight-sync client uses:
#   /pause /resume /is_paused /collective_rpc (reload_weights) /update_weight_version
#   /weight_info, and the NCCL weight-transfer routes (/init_weight_transfer_engine,
#   /start_weight_update, /update_weights, /finish_weight_update).
# They are unauthenticated admin routes: keep the port on the cluster network only.
export VLLM_SERVER_DEV_MODE=1

# Layout. 35B-A3B is ~70 GB in bf16 and 3B active: rollout throughput comes from replicas, not
# from splitting each token's work. 4 data-parallel replicas x TP 2 = 8 GPUs; with
# --enable-expert-parallel the 256 experts are spread over all 8 GPUs (EP = DP x TP = 8) while
# attention / Gated DeltaNet run TP 2 inside each replica. (vLLM's Qwen3.5 recipe serves
# chat with --tensor-parallel-size 8: lower latency per request, lower throughput.)
#
# --logprobs-mode raw_logprobs: the log-probs returned with each sampled token are the policy's
#   own (raw logits, before temperature/top-p/top-k) -- what GRPO's importance ratio and the
#   staleness checks need. (It is vLLM's default; spelled out because it matters.)
# --enable-prefix-caching: GRPO samples G rollouts per prompt, and agent turns extend the
#   previous turn: the shared prefix is computed once. /pause clears the cache on weight updates.
# --max-model-len 131072: the recipe's trajectory length.
# --weight-transfer-config '{"backend": "nccl"}': lets the trainer broadcast weights over NCCL
#   (the fast path, see weight_sync.py). The disk path (/collective_rpc reload_weights with an
#   HF dir on shared storage) works with or without it.
# --reasoning-parser / --tool-call-parser / --enable-auto-tool-choice only affect the OpenAI chat
#   endpoints (/v1/chat/completions) -- for people chatting with or evaluating the policy. The
#   token-in/token-out endpoint (/inference/v1/generate) ignores them: our agent loop renders and
#   parses Qwen3.5's template itself (megatron_a1/rollout/parse.py).
exec vllm serve "$MODEL" \
    --served-model-name agents-a1-policy \
    --host 0.0.0.0 --port "$PORT" \
    --data-parallel-size 4 --tensor-parallel-size 2 --enable-expert-parallel \
    --dtype bfloat16 \
    --max-model-len 131072 \
    --gpu-memory-utilization 0.88 \
    --enable-prefix-caching \
    --logprobs-mode raw_logprobs \
    --weight-transfer-config '{"backend": "nccl"}' \
    --reasoning-parser qwen3 \
    --enable-auto-tool-choice --tool-call-parser qwen3_coder
