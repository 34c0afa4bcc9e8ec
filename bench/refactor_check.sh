#!/usr/bin/env bash
# A refactor changes nothing a user can observe: run fixed configurations with the code at BEFORE (a
# commit) and with the working tree, and compare each pair of run directories with bench/same_run.py
# (metrics.jsonl record by record but the wall-clock fields, rollouts.jsonl byte for byte, the exported
# weights bit for bit, the checkpoints kept, config.json).
#
#   bench/refactor_check.sh BEFORE [CONFIGS]      e.g. bench/refactor_check.sh c9361b7 "A B D E F G H X M L"
#
# Each run has one torch thread (--threads 1, OMP_NUM_THREADS=1), so two run side by side on 2 cores and
# bits do not depend on the thread count. SmolLM2-135M-Instruct (the embedded model); about 3 minutes per
# configuration per side on a 2-core CPU. Outputs go to $WORK (default /tmp/fastrft-refactor-check).
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: bench/refactor_check.sh BEFORE_COMMIT [CONFIGS]}
CONFIGS=${2:-"A B D E F G H"}
WORK=${WORK:-/tmp/fastrft-refactor-check}
PY=${PY:-$PWD/.venv/bin/python}
rm -rf "$WORK" && mkdir -p "$WORK/runs-before" "$WORK/runs-after"
git worktree add --detach -f "$WORK/before" "$BEFORE" >/dev/null
trap 'git worktree remove --force "$WORK/before"' EXIT
cp fastrft/_engine*.so "$WORK/before/fastrft/" 2>/dev/null || true  # the C++ extension, built here
# Commits before 2026-12-07 kept the kernels at the root, installed as fastrft.kernels: move them there (a
# top-level kernels/ on PYTHONPATH would shadow the `kernels` package that transformers imports).
if [ -d "$WORK/before/kernels" ]; then mv "$WORK/before/kernels" "$WORK/before/fastrft/kernels"; fi

run() {  # run SRC OUT CONFIG
  local src=$1 out=$2 c=$3
  local common=(--model smollm2-135m-instruct --no-progress --threads 1 --seed 11)
  export PYTHONPATH=$src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  case $c in
  A) # fp32 GSM8K; KL; 2 PPO epochs x 2 mini-batches; a token budget that splits each step; evaluations; checkpoints
    "$PY" -m fastrft train "${common[@]}" --dataset gsm8k --example-index 3 --group-size 6 --max-new-tokens 40 \
      --kl-coef 0.05 --ppo-epochs 2 --mini-batches 2 --max-tokens-per-step 330 --rounds 4 --eval-every 2 \
      --save-every 2 --keep-checkpoints 2 --test-size 6 --eval-max-new-tokens 40 --log-samples 12 --lr 2e-5 \
      --out "$out/A" ;;
  B) # bf16-mixed; 2 examples per round from a pool; window baseline; entropy bonus; reward {-1,1}; cosine schedule
    "$PY" -m fastrft train "${common[@]}" --precision bf16-mixed --dataset arithmetic --examples-per-round 2 \
      --train-pool 8 --group-size 4 --max-new-tokens 24 --advantage window --window 6 --reward-fail -1 \
      --entropy-coef 0.01 --kl-coef 0.02 --max-tokens-per-step 150 --rounds 5 --eval-every 2 --save-every 1 \
      --test-size 6 --train-eval-size 4 --lr 3e-5 --schedule cosine --warmup-rounds 1 --log-samples 8 --out "$out/B" ;;
  D) # two processes (gloo, FSDP2 + DCP), uneven micro-batch plans
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m fastrft train "${common[@]}" \
      --dataset arithmetic --group-size 5 --max-new-tokens 24 --kl-coef 0.05 --mini-batches 2 \
      --max-tokens-per-step 120 --rounds 3 --eval-every 3 --save-every 1 --test-size 4 --log-samples 10 --lr 2e-5 \
      --out "$out/D" ;;
  E) # extra-samples baseline, difficulty selection, greedy evaluation, 2 PPO epochs
    "$PY" -m fastrft train "${common[@]}" --dataset arithmetic --difficulty 0:1 --difficulty-samples 2 \
      --difficulty-candidates 4 --group-size 3 --max-new-tokens 20 --advantage extra_samples --extra-samples 2 \
      --rounds 3 --eval-every 3 --test-size 4 --greedy --log-samples 6 --ppo-epochs 2 --out "$out/E" ;;
  F) # fp32 add2 with KL, 2 PPO epochs x 2 mini-batches, a budget that splits each step, clip-high
    "$PY" -m fastrft train "${common[@]}" --dataset arithmetic --level add2 --group-size 6 --max-new-tokens 32 \
      --advantage grpo --kl-coef 0.05 --ppo-epochs 2 --mini-batches 2 --max-tokens-per-step 200 --rounds 4 \
      --eval-every 2 --save-every 2 --keep-checkpoints 3 --test-size 6 --log-samples 12 --lr 3e-5 --clip-high 0.28 \
      --out "$out/F" ;;
  G) # as F on add1, where the rewards vary
    "$PY" -m fastrft train "${common[@]}" --dataset arithmetic --level add1 --group-size 6 --max-new-tokens 64 \
      --advantage grpo --kl-coef 0.05 --ppo-epochs 2 --mini-batches 2 --max-tokens-per-step 250 --rounds 4 \
      --eval-every 2 --save-every 2 --keep-checkpoints 3 --test-size 6 --log-samples 12 --lr 3e-5 --clip-high 0.28 \
      --out "$out/G" ;;
  H) # 3 examples per round from a difficulty band, top-p/top-k, no KL (rounds skipped), 2 epochs x 3 mini-batches,
     # seq-mean aggregation, activation checkpointing, an extra reward, greedy evaluation, TensorBoard, warmup
    "$PY" -m fastrft train "${common[@]}" --dataset arithmetic --level add1 --difficulty 0.2:0.9 \
      --difficulty-samples 4 --difficulty-candidates 12 --examples-per-round 3 --train-pool 40 --group-size 3 \
      --max-new-tokens 40 --top-p 0.95 --top-k 50 --temperature 0.9 --advantage grpo --kl-coef 0 --ppo-epochs 2 \
      --mini-batches 3 --aggregation seq-mean-token-mean --max-tokens-per-step 160 --activation-checkpointing \
      --rounds 5 --eval-every 2 --greedy --extra-rewards gsm8k --train-eval-size 3 --test-size 5 --tensorboard \
      --save-every 2 --lr 3e-5 --warmup-rounds 2 --schedule linear --log-samples 9 --out "$out/H" ;;
  X) # the exact mode in bf16-mixed: GSM8K prompts across attention tiles, a KV cache small enough to preempt,
     # a token budget that splits prefill and the steps, 2 PPO epochs x 2 mini-batches (no old-log-prob pass)
    "$PY" -m fastrft train "${common[@]}" --precision bf16-mixed --exact-logprobs on --dataset gsm8k \
      --examples-per-round 2 --train-pool 8 --group-size 4 --max-new-tokens 40 --kv-cache-memory 6000000 \
      --advantage grpo --kl-coef 0.02 --ppo-epochs 2 --mini-batches 2 --max-tokens-per-step 300 --rounds 3 \
      --eval-every 3 --test-size 3 --train-eval-size 2 --save-every 3 --lr 2e-5 --log-samples 8 --out "$out/X" ;;
  M) # the defaults in bf16-mixed (the exact mode auto: off), one example, small sizes
    "$PY" -m fastrft train "${common[@]}" --precision bf16-mixed --dataset gsm8k --example-index 1 --group-size 4 \
      --max-new-tokens 32 --rounds 3 --eval-every 3 --test-size 3 --save-every 3 --log-samples 8 --out "$out/M" ;;
  L) # a two-layer ladder (L0 and L3 of the paper's ladder, the cpu-mini profile, one seed)
    "$PY" -m fastrft ladder --layers L0,L3 --seeds 1 --profile cpu-mini --keep-models --model smollm2-135m-instruct \
      --threads 1 --seed 11 --rounds 3 --eval-every 3 --test-size 3 --max-new-tokens 24 --out "$out/L" \
      > /dev/null ;;
  *) echo "unknown configuration $c" >&2; return 2 ;;
  esac
}

status=0
for c in $CONFIGS; do
  ( run "$WORK/before" "$WORK/runs-before" "$c" > "$WORK/runs-before/$c.log" 2>&1 ) &
  if [ "$c" = D ]; then wait; fi  # two processes already: the sides of D run one after the other
  ( run "$PWD" "$WORK/runs-after" "$c" > "$WORK/runs-after/$c.log" 2>&1 ) &
  wait
  if [ "$c" = L ]; then  # a study: every run directory in it
    for run_dir in "$WORK/runs-before/L"/*/seed-*; do
      rel=${run_dir#"$WORK/runs-before/L/"}
      printf '%s %s: ' "$c" "$rel"
      "$PY" bench/same_run.py "$run_dir" "$WORK/runs-after/L/$rel" 2>/dev/null | grep -v '^exported' || status=1
    done
    continue
  fi
  printf '%s: ' "$c"
  "$PY" bench/same_run.py "$WORK/runs-before/$c" "$WORK/runs-after/$c" 2>/dev/null | grep -v '^exported' || status=1
done
exit $status
