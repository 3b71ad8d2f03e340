#!/usr/bin/env bash
# GPU-CLUSTER RECIPE (not run by CI or the CPU demo): serve the domain teachers with vLLM, four
# 35B-A3B teachers on one 8-GPU node (2 GPUs each), one port per teacher.
#
#   TEACHERS="math=/shared/teachers/math_hf code=/shared/teachers/code_hf \
#             search=/shared/teachers/search_hf tool=/shared/teachers/tool_hf" \
#       bash examples/serving/vllm_teachers.sh
#
# Teachers are frozen: no RL routes, no weight transfer. Uses:
# * evaluation and chat (reasoning / tool-call parsers below, /v1/chat/completions);
# * generating SFT data for a domain;
# * scoring student rollouts for OPD from a separate node (opd.teacher_servers): the trainer
#   asks POST /v1/completions for prompt_logprobs, which vLLM V1 versions have refused with
#   prefix caching on: serve a scoring teacher with vllm_opd_teacher.sh instead.
set -euo pipefail
TEACHERS=${TEACHERS:?set TEACHERS="name=hf_dir ..." (at most 4)}
BASE_PORT=${BASE_PORT:-8100}

i=0
pids=()
for spec in $TEACHERS; do
    name=${spec%%=*}; dir=${spec#*=}
    gpus="$((2 * i)),$((2 * i + 1))"
    port=$((BASE_PORT + i))
    echo "teacher $name: GPUs $gpus, port $port, weights $dir"
    # TP 2 with expert parallelism inside the pair: ~35 GB of weights per GPU, the rest KV cache.
    # --max-logprobs must be >= the K the OPD loss uses (SVA top-k).
    CUDA_VISIBLE_DEVICES=$gpus vllm serve "$dir" \
        --served-model-name "teacher-$name" \
        --host 0.0.0.0 --port "$port" \
        --tensor-parallel-size 2 --enable-expert-parallel \
        --dtype bfloat16 \
        --max-model-len 131072 \
        --gpu-memory-utilization 0.88 \
        --enable-prefix-caching \
        --max-logprobs 64 \
        --reasoning-parser qwen3 \
        --enable-auto-tool-choice --tool-call-parser qwen3_coder &
    pids+=($!)
    i=$((i + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
wait
