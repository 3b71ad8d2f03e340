#!/usr/bin/env bash
# GPU-CLUSTER RECIPE (not run by CI or the CPU demo): serve one OPD teacher with vLLM for its
# top-k prompt log-probs, the teacher of `opd.teacher_servers` (megatron_a1/training/opd.py,
# ServedTeacher; client: HTTPEngine.prompt_topk in megatron_a1/rollout/http.py).
#
#   MODEL=/shared/teachers/tool_hf PORT=8100 GPUS=0,1 bash examples/serving/vllm_opd_teacher.sh
#
# and in the OPD config:
#   opd: {topk: 64, teacher_servers: {tool: "http://HOST:8100"}, teacher_server_backend: vllm}
#
# Each rank of the trainer sends every rollout of its micro-batches as token ids:
#   POST /v1/completions {"prompt": [ids], "max_tokens": 1, "prompt_logprobs": 64,
#                         "temperature": 0}
# and reads choices[0].prompt_logprobs (the top-64 at every position, plus the prompt token).
# * --max-logprobs must be >= opd.topk;
# * --logprobs-mode raw_logprobs (vLLM's default, spelled out): log-probs of the raw logits;
# * --no-enable-prefix-caching: vLLM V1 versions have refused prompt_logprobs with prefix
#   caching on, and a cache hit saves nothing here (every position's logits are needed);
# * --max-model-len >= data.max_seq_len: rollouts are scored whole;
# * the teacher must use the student's tokenizer: the ids are the student's (the trainer checks
#   that every id returned is inside the student's vocabulary).
set -euo pipefail
MODEL=${MODEL:?set MODEL=the teacher HF dir}
PORT=${PORT:-8100}
GPUS=${GPUS:-0,1}
TP=$(echo "$GPUS" | tr ',' '\n' | wc -l)

CUDA_VISIBLE_DEVICES=$GPUS exec vllm serve "$MODEL" \
    --host 0.0.0.0 --port "$PORT" \
    --tensor-parallel-size "$TP" --enable-expert-parallel \
    --dtype bfloat16 \
    --max-model-len 131072 \
    --gpu-memory-utilization 0.88 \
    --max-logprobs 64 \
    --logprobs-mode raw_logprobs \
    --no-enable-prefix-caching
