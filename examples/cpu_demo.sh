#!/usr/bin/env bash
# The CPU demo (`make demo`): the report's recipe end to end on a laptop-sized model.
#   1. preprocess the bundled sample trajectories and student rollouts (Qwen3.5 template, loss
#      masks, Megatron indexed datasets);
#   2. stage 1 - SFT the tiny Agents-A1 hybrid MoE (GDN + gated attention + MoE, 8 experts top-2)
#      on 2 gloo ranks with expert parallelism 2 (alltoall dispatcher, distributed optimizer,
#      dist_checkpointing): the loss visibly falls;
#   3. stage 2 - two domain teachers, each SFT'd briefly from the student on its domains, and a
#      GRPO teacher trained online: the embedded engine samples groups on a verifiable
#      instruction task on 2 data-parallel ranks, the environment rewards them, dynamic sampling
#      drops all-equal groups: the mean reward visibly rises;
#   4. stage 3 - on-policy distillation: each rollout scored by its domain's teacher, SVA loss,
#      first on the bundled student rollouts, then on rollouts the student samples online;
#   5. print where checkpoints, metrics and TensorBoard logs went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/demo                      # the example configs point here
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
rm -rf "$OUT"

train() {  # train NAME CONFIG [overrides...]: one torchrun job on 2 local gloo ranks
    local name=$1 config=$2; shift 2
    echo "== $name"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_a1.train \
        --config "$config" "$@" 2> >(grep -vE "Warning|warn\(|W[0-9]{4} |cpp_extension" >&2)
}
loss_fell() {  # loss_fell METRICS.jsonl LABEL [N]: mean loss of the last N steps < first N
    "$PY" - "$1" "$2" "${3:-1}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = int(sys.argv[3])
first = sum(r["loss"] for r in rows[:n]) / n
last = sum(r["loss"] for r in rows[-n:]) / n
what = "" if n == 1 else f" (mean of the first/last {n} steps)"
print(f"   {sys.argv[2]}: loss {first:.4f} -> {last:.4f} over {len(rows)} steps{what}")
sys.exit(0 if last < first else f"{sys.argv[2]}: the loss did not fall")
PY
}
reward_rose() {  # reward_rose METRICS.jsonl LABEL: mean reward of the last 3 steps > first 2
    "$PY" - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l)["rollout/all/reward"] for l in open(sys.argv[1])]
first, last = sum(rows[:2]) / 2, sum(rows[-3:]) / 3
print(f"   {sys.argv[2]}: mean reward {first:.3f} (first 2 steps) -> {last:.3f} (last 3 steps); "
      "per step " + " ".join(f"{r:.2f}" for r in rows))
sys.exit(0 if last > first else f"{sys.argv[2]}: the reward did not rise")
PY
}

echo "== 1/4 preprocess"
mkdir -p "$OUT/data"
"$PY" - "$OUT/data" <<'PY'
import json, sys
groups = {"research": {"search", "science"}, "agentic": {"coding", "instruction", "tool"}}
out = {g: open(f"{sys.argv[1]}/{g}.jsonl", "w") for g in groups}
for line in open("examples/data/trajectories.jsonl"):
    domain = json.loads(line)["domain"]
    for g, domains in groups.items():
        if domain in domains:
            out[g].write(line)
PY
prep() { "$PY" tools/preprocess_trajectories.py --tokenizer qwen --max-seq-len 1024 \
             --overlong truncate --workers 1 --no-progress --input "$1" --output-prefix "$2"; }
prep examples/data/trajectories.jsonl "$OUT/data/sft"
prep "$OUT/data/research.jsonl" "$OUT/data/research"
prep "$OUT/data/agentic.jsonl" "$OUT/data/agentic"
prep examples/data/rollouts.jsonl "$OUT/data/rollouts"

train "2/4 stage 1: SFT the student" examples/configs/sft_tiny_cpu.yaml
loss_fell "$OUT/sft/metrics.jsonl" "SFT"

for teacher in research agentic; do
    train "3/4 stage 2: $teacher teacher (SFT from the student on its domains)" \
        examples/configs/sft_tiny_cpu.yaml "data.prefixes=[$OUT/data/$teacher]" \
        model.init_from=$OUT/sft/checkpoints train.train_steps=6 optim.warmup_steps=1 \
        checkpoint.dir=$OUT/teacher_$teacher/checkpoints checkpoint.save_interval=0 \
        logging.tensorboard_dir=$OUT/teacher_$teacher/tensorboard \
        logging.metrics_jsonl=$OUT/teacher_$teacher/metrics.jsonl
    loss_fell "$OUT/teacher_$teacher/metrics.jsonl" "$teacher teacher"
done

train "3/4 stage 2: GRPO teacher, online rollouts (embedded engine, 2 DP ranks)" \
    examples/configs/grpo_tiny_cpu.yaml
reward_rose "$OUT/grpo/metrics.jsonl" "GRPO"

train "4/4 stage 3: on-policy distillation (SVA) from the domain teachers" \
    examples/configs/opd_tiny_cpu.yaml
loss_fell "$OUT/opd/metrics.jsonl" "OPD (SVA)"

train "4/4 stage 3: on-policy distillation on the student's own online rollouts" \
    examples/configs/opd_online_tiny_cpu.yaml
# fresh samples every step: compare the last 3 steps with the first 3 (the same 12 prompts)
loss_fell "$OUT/opd_online/metrics.jsonl" "online OPD (SVA)" 3

echo
for run in sft teacher_research teacher_agentic grpo opd opd_online; do
    echo "$run: checkpoints $OUT/$run/checkpoints ($(cat "$OUT/$run/checkpoints/latest")), metrics $OUT/$run/metrics.jsonl"
done
echo "tensorboard --logdir $OUT"
