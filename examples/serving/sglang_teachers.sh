#!/usr/bin/env bash
# GPU-CLUSTER RECIPE (not run by CI or the CPU demo): serve the domain teachers with SGLang, four
# 35B-A3B teachers on one 8-GPU node (2 GPUs each), one port per teacher. Same uses as
# vllm_teachers.sh; with SGLang, teacher log-probs of a given token sequence come from
# POST /generate {"input_ids": ..., "sampling_params": {"max_new_tokens": 1},
# "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": K}
# (meta_info.input_token_logprobs / input_top_logprobs): what the OPD trainer sends for
# opd.teacher_servers with opd.teacher_server_backend=sglang.
#
#   TEACHERS="math=/shared/teachers/math_hf code=/shared/teachers/code_hf" \
#       bash examples/serving/sglang_teachers.sh
set -euo pipefail
TEACHERS=${TEACHERS:?set TEACHERS="name=hf_dir ..." (at most 4)}
BASE_PORT=${BASE_PORT:-30100}
export SGLANG_RETURN_ORIGINAL_LOGPROB=1  # unscaled log-probs, as the distillation loss expects

i=0
pids=()
for spec in $TEACHERS; do
    name=${spec%%=*}; dir=${spec#*=}
    gpus="$((2 * i)),$((2 * i + 1))"
    port=$((BASE_PORT + i))
    echo "teacher $name: GPUs $gpus, port $port, weights $dir"
    CUDA_VISIBLE_DEVICES=$gpus python -m sglang.launch_server \
        --model-path "$dir" \
        --served-model-name "teacher-$name" \
        --host 0.0.0.0 --port "$port" \
        --tp-size 2 --ep-size 2 \
        --dtype bfloat16 \
        --context-length 131072 \
        --mem-fraction-static 0.85 \
        --reasoning-parser qwen3 \
        --tool-call-parser qwen3_coder &
    pids+=($!)
    i=$((i + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
wait
