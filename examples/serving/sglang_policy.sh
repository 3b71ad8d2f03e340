#!/usr/bin/env bash
# GPU-CLUSTER RECIPE (not run by CI or the CPU demo): serve the 35B-A3B policy with SGLang on one
# 8-GPU node for rollouts. The trainer reaches it with
#     HTTPEngine("http://HOST:30000", backend="sglang")       # megatron_a1/rollout/http.py
# and pushes new weights with SGLangWeightSync (POST /update_weights_from_disk, or the NCCL
# path /init_weights_update_group + /update_weights_from_distributed).
#
#   MODEL=/shared/ckpt/policy_hf bash examples/serving/sglang_policy.sh
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3.5-35B-A3B}
PORT=${PORT:-30000}

# SGLang returns log-probs after temperature scaling unless told otherwise; RL needs the
# policy's own log-probs (what Generation.logprobs documents), so:
export SGLANG_RETURN_ORIGINAL_LOGPROB=1

# Layout: 4 data-parallel replicas x TP 2, experts spread over all 8 GPUs (--ep-size 8), as in
# vllm_policy.sh (3B active parameters: replicas give the throughput). For lowest latency
# instead: --tp-size 8 --ep-size 8 without --dp-size.
# --weight-version 0: the version generations report in meta_info.weight_version until the
#   first update (update_weights_from_disk's weight_version replaces it).
# --reasoning-parser / --tool-call-parser only affect the OpenAI chat endpoints; /generate with
#   input_ids (what HTTPEngine uses) returns raw token ids.
exec python -m sglang.launch_server \
    --model-path "$MODEL" \
    --served-model-name agents-a1-policy \
    --host 0.0.0.0 --port "$PORT" \
    --dp-size 4 --tp-size 2 --ep-size 8 \
    --dtype bfloat16 \
    --context-length 131072 \
    --mem-fraction-static 0.85 \
    --weight-version 0 \
    --reasoning-parser qwen3 \
    --tool-call-parser qwen3_coder
