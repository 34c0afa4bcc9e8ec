#!/usr/bin/env bash
# The whole GPU pass of fastrft in one call: install, the GPU tests, the LM-head, round-time and rollout
# benchmarks, within a time budget, every result in one folder.
#
#   bash bench/gpu_suite.sh OUT_DIR [--budget SECONDS] [--cpu-smoke] [--stages LIST]
#
# On a lent H100/H200 (no network; its python3 3.12 holds torch 2.11, triton 3.6, transformers 5.17), from
# the repo root, through the device tool:
#   run(command="bash bench/gpu_suite.sh $OUT", carry=[".whl"], timeout_s=600)
#
# GPU mode (the default; budget 480 s, everything included):
#   - refuses to start unless torch sees a CUDA device: one line on stderr, exit 2, nothing written;
#   - setup: the wheels carried in .whl/ go into /tmp/site (on PYTHONPATH), then fastrft itself, editable,
#     with no dependencies, no index and no build isolation, so the machine's torch and triton stay as they
#     are; that builds the C++ extension there (FASTRFT_BUILD_JOBS = all cores). If the machine's
#     setuptools is older than 77 (pyproject.toml's license field needs 77), the one in .whl/fallback/ is
#     used for the build only;
#   - then the stages, most essential first, each given a share of the time left when it starts (tests
#     22 %, logprob 35 %, round 50 %, rollout the rest, 10 s kept for the summary) and stopped at its end:
#       tests    pytest on what needs the GPU: `-m gpu` if pyproject.toml registers a `gpu` marker, else
#                the test files whose DEVICE is "cuda" when available (the kernel tests and the
#                bf16-mixed trainer tests, tests/loop/test_precision.py); in parallel
#                with pytest-xdist when it is installed;
#       logprob  bench/bench_logprob.py: Qwen2.5-1.5B and Llama-3.2-1B shapes, bf16, N 4k/16k/64k,
#                cublas-3mm, naive, reference, triton, triton-entropy, and liger when importable;
#       round    bench/bench_round.py: one RFT round through the Trainer, L0 (G = 1), G = 8, G = 64,
#                1,024-token responses, random-weight Qwen2.5-1.5B shape, bf16-mixed (the CUDA default:
#                fp32 masters, bf16 compute) with the automatic token budget, split into phases, with
#                the round's peak GPU memory: the GPU half of bench/bench_memory.py's question;
#       rollout  bench/bench_rollout.py: Qwen2.5-1.5B shape, workloads (a) and (b), fastrft against
#                transformers at batch 1, 64 and 256.
#     Each benchmark estimates a case before it starts it and drops the cases that would not fit (the
#     largest N, G or batch first); the summary lists what was dropped.
#   - --stages picks and orders the stages (default tests,logprob,round,rollout); four more are available:
#       exact    bench/bench_exact.py: seconds per round with --exact-logprobs on against off, bf16-mixed,
#                random-weight Qwen2.5-0.5B, one step and 2 x 2 PPO steps per round, and each mode's
#                logp_gap_max (0 when on); exact.md. Its share is 40 % of the time left.
#       dist     bench/bench_dist.py: torchrun at world size 1 (NCCL) with a sharded checkpoint and its
#                export, then `fastrft ladder --jobs 1` against `--jobs 2` on the one GPU (dist.json,
#                dist.md; BENCH_DIST_ARGS adds flags). Its share is 60 % of the time left; the last stage
#                listed gets all of it.
#       lora     bench/bench_lora.py: one L0 round (256-token response) of a random-weight Qwen2.5-7B shape
#                with r = 16 adapters on every projection, bf16-mixed: peak GPU memory and time; then
#                batch-256 decode, Qwen2.5-1.5B shape, adapters against none (lora.md). Its share is 50 %.
#       trl      bench/bench_trl.py: one RFT round through TRL's GRPOTrainer and through fastrft, interleaved
#                in one process, G = 4 and 8, 96-token responses, random-weight Qwen2.5-0.5B, bf16 (TRL
#                generates with transformers: no vLLM there); needs trl and datasets from .whl/ (below).
#                Its share is 50 % of the time left; its table is appended to summary.md (trl.md and
#                trl.json go into suite.tar.gz, its rows into results.csv). BENCH_TRL_ARGS adds flags
#                (e.g. --shape qwen2.5-1.5b).
#
# --cpu-smoke: every stage end to end on CPU with tiny shapes (a tiny model, N = 512, 8-token responses,
# G = 2) in well under a minute of CPU time; installs nothing (fastrft must already be importable) and
# pytest only collects the GPU selection. tests/test_gpu_suite.py runs it, so this script cannot rot
# between GPU runs. PYTHON (default python3) picks the interpreter.
#
# OUT_DIR receives at most 10 files, no subfolders, as the device tool brings back: summary.md (every
# table, the test counts, each stage's status and time, what was dropped), suite.log (everything
# printed), pytest.txt, logprob.json, round.json, rollout.json (raw rows), results.csv (the same rows,
# flat), dist.json and dist.md (the dist stage) and suite.tar.gz (all of them plus each stage's table as NAME.md and the install log). They are
# rewritten after every stage, so a run stopped early keeps what it measured.
#
# Wheels. Compared with the device image's package list (/work/.library/device/KINDS.md), fastrft's
# dependencies and test extra lack math-verify (with latex2sympy2_extended and antlr4-python3-runtime;
# sympy is there) and gguf (its numpy, pyyaml, requests and tqdm are there); liger-kernel is optional
# (the LM-head benchmark's Liger provider; needs only torch and triton). triton, pinned ==3.7.1 in the
# test extra, is never carried: the machine's 3.6 is the one its torch was built with. The trl stage
# needs trl and datasets (the optional extra `peers`) with datasets' dill and multiprocess; their other
# needs (accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, psutil) are in the image, at
# versions not checked against datasets 5.2's pins (pyarrow >= 24, fsspec <= 2026.9.0). Fetch them once,
# from the repo root (.whl/ is git-ignored, about 4.4 MB in all):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
#     gguf==0.19.0 liger-kernel==0.8.5
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19   # the trl stage, about 1.8 MB
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl/fallback setuptools==80.9.0
#
# Exit status: 0 when every stage ran (or was stopped at its time slice, or dropped for time), 1 when a
# stage failed (failing tests included), 2 for a usage error or a machine without CUDA, 3 when setup failed.

set -uo pipefail

usage() {
    echo "usage: bash bench/gpu_suite.sh OUT_DIR [--budget SECONDS] [--cpu-smoke]" >&2
    exit 2
}

OUT_DIR="" SMOKE=0 BUDGET="" STAGES="tests,logprob,round,rollout"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
        --budget=*) BUDGET=${1#*=} ;;
        --stages) [ $# -ge 2 ] || usage; STAGES=$2; shift ;;
        --stages=*) STAGES=${1#*=} ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUT_DIR" ] || usage; OUT_DIR=$1 ;;
    esac
    shift
done
[ -n "$OUT_DIR" ] || usage
if [ $SMOKE = 1 ]; then BUDGET=${BUDGET:-120}; else BUDGET=${BUDGET:-480}; fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2; }

START=$(date +%s)
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2

if [ $SMOKE = 0 ]; then
    check='import torch; print("" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")'
    reason=$($PY -c "$check" 2>/dev/null) || reason="$PY cannot import torch"
    if [ -n "$reason" ]; then
        echo "gpu_suite.sh: refusing to start: $reason; run it on the GPU machine," \
            "or pass --cpu-smoke for the CPU smoke pass" >&2
        exit 2
    fi
fi

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT_DIR/suite.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RESERVE=10                                   # seconds kept for the last summary
MIN_SLICE=$([ $SMOKE = 1 ] && echo 5 || echo 20)
FAILED=0

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu_suite $(elapsed) s] $*" | tee -a "$LOG"; }
info() { echo "$*" >>"$WORK/suite.txt"; }

# Rewrite OUT_DIR from WORK: the summary, the raw files, and the tarball of everything.
finish() {
    $PY bench/harness.py summary "$WORK" "$OUT_DIR/summary.md" >>"$LOG" 2>&1 || say "summary failed"
    [ -f "$WORK/trl.md" ] && printf '\n## RFT round: fastrft vs TRL\n\n%s\n' "$(cat "$WORK/trl.md")" >>"$OUT_DIR/summary.md"
    [ -f "$WORK/exact.md" ] && printf '\n## Exact log-probs: round cost, on against off\n\n%s\n' "$(cat "$WORK/exact.md")" \
        >>"$OUT_DIR/summary.md"
    [ -f "$WORK/lora.md" ] && printf '\n## LoRA: a 7B round on one GPU, decode with adapters\n\n%s\n' \
        "$(cat "$WORK/lora.md")" >>"$OUT_DIR/summary.md"
    local f
    for f in pytest.txt logprob.json round.json rollout.json results.csv dist.json dist.md; do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/$f"
    done
    cp "$OUT_DIR/summary.md" "$LOG" "$WORK/" 2>/dev/null
    tar -czf "$OUT_DIR/suite.tar.gz" -C "$WORK" . 2>>"$LOG"
}

# stage NAME PERCENT FUNCTION: FUNCTION runs with SLICE = PERCENT % of the time left (after RESERVE).
stage() {
    local name=$1 pct=$2 fn=$3 left t0 rc status
    left=$((BUDGET - $(elapsed) - RESERVE))
    SLICE=$((left * pct / 100))
    if [ $SLICE -lt $MIN_SLICE ]; then
        say "stage $name dropped: ${left} s left"
        printf '%s\tdropped (%s s left)\t0\t%s\n' "$name" "$left" "$SLICE" >>"$WORK/stages.tsv"
        finish
        return
    fi
    say "stage $name: time slice $SLICE s"
    t0=$(date +%s)
    $fn
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 130 | 137) status="stopped at its time slice" ;;
        *) status="failed (exit $rc)"; FAILED=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$SLICE" >>"$WORK/stages.tsv"
    say "stage $name: $status"
    finish
}

# ------------------------------------------------------------------------------------------ setup
setup_gpu() {
    local wheels build_path
    wheels=$(ls .whl/*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then
        # shellcheck disable=SC2086
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
            || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        info "wheels installed: $(for w in $wheels; do basename "$w"; done | tr '\n' ' ')"
    else
        info "wheels installed: none (.whl/ not carried): math-verify falls back, the liger provider is skipped"
    fi
    build_path=${PYTHONPATH:-}
    if ! $PY -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
        wheels=$(ls .whl/fallback/setuptools-*.whl 2>/dev/null)
        [ -n "$wheels" ] || { echo "setuptools < 77 and no .whl/fallback/setuptools-*.whl carried"; return 1; }
        # shellcheck disable=SC2086
        $PY -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site-build $wheels || return 1
        build_path=/tmp/site-build${build_path:+:$build_path}
        info "setuptools: the machine's is older than 77; built with $(basename "$wheels")"
    fi
    if FASTRFT_BUILD_JOBS=$(nproc) PYTHONPATH=$build_path \
        $PY -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e .; then
        info "fastrft: installed editable (pip --no-deps --no-build-isolation)"
    else
        echo "pip install -e . failed: building in place instead"
        install_in_place || return 1
    fi
}

# The fallback (an unwritable environment, say): compile the extension with pybind11 straight into
# fastrft/ in this disposable copy of the tree, and put the tree on PYTHONPATH.
install_in_place() {
    local suffix build=/tmp/fastrft_build f pids=() flags
    suffix=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') || return 1
    flags="-O3 -g0 -std=c++17 -fPIC -fvisibility=hidden $($PY -m pybind11 --includes)" || return 1
    mkdir -p "$build"
    for f in csrc/*.cpp; do
        # shellcheck disable=SC2086
        c++ $flags -c "$f" -o "$build/$(basename "$f" .cpp).o" &
        pids+=($!)
    done
    for f in "${pids[@]}"; do wait "$f" || return 1; done
    c++ -shared "$build"/*.o -o "fastrft/_engine$suffix" || return 1
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    info "fastrft: pip install -e . failed (see the install log); built in place: fastrft/_engine$suffix," \
        "the tree on PYTHONPATH"
}

setup() {
    local t0 rc=0
    t0=$(date +%s)
    info "mode: $([ $SMOKE = 1 ] && echo cpu-smoke || echo gpu); budget: $BUDGET s;" \
        "started: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); cores: $(nproc)"
    if [ $SMOKE = 1 ]; then
        info "install: none (cpu-smoke uses the fastrft already installed)"
    else
        say "setup: wheels, then fastrft (editable, building the C++ extension)"
        setup_gpu >"$WORK/setup.log" 2>&1 || rc=1
        cat "$WORK/setup.log" >>"$LOG"
    fi
    # device, versions, commit, where fastrft comes from, whether the C++ extension imports
    $PY bench/harness.py env >>"$WORK/suite.txt" 2>>"$LOG" || rc=1
    info "setup: $([ $rc = 0 ] && echo ok || echo FAILED, see suite.log) in $(($(date +%s) - t0)) s"
    return $rc
}

# ------------------------------------------------------------------------------------------ stages
stage_tests() {
    local sel args=() extra=()
    if $PY - <<'EOF' 2>/dev/null
import sys, tomllib
markers = tomllib.load(open("pyproject.toml", "rb"))["tool"]["pytest"]["ini_options"].get("markers", [])
sys.exit(0 if any(m.split(":")[0].strip() == "gpu" for m in markers) else 1)
EOF
    then
        sel=(-m gpu tests)
    else
        mapfile -t sel < <(grep -lE '^DEVICE = "cuda" if torch\.cuda\.is_available\(\)' tests/test_*.py)
        [ ${#sel[@]} -gt 0 ] || sel=(-k "cuda or gpu" tests)
    fi
    if [ $SMOKE = 1 ]; then
        args=(--collect-only -q)
    else
        args=(-q -rfE)
        $PY -c 'import xdist' 2>/dev/null && extra+=(-n 8)
        $PY -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout=120)
    fi
    echo "selection: ${sel[*]}$([ $SMOKE = 1 ] && echo ' (cpu-smoke: collected only)')" >"$WORK/pytest.txt"
    timeout -s INT -k 15 "$SLICE" $PY -m pytest -p no:cacheprovider "${args[@]}" "${extra[@]}" "${sel[@]}" 2>&1 \
        | tee -a "$WORK/pytest.txt" "$LOG" | tail -n 5
    return "${PIPESTATUS[0]}"
}

# Each benchmark gets the slice less 5 s for its imports as its own budget; timeout is the backstop.
bench() {
    timeout -s INT -k 10 $((SLICE + 20)) $PY "$@" --budget $((SLICE > 10 ? SLICE - 5 : SLICE)) --out "$WORK" 2>&1 \
        | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

stage_logprob() {
    if [ $SMOKE = 1 ]; then bench bench/bench_logprob.py --in-process --device cpu --smoke
    else bench bench/bench_logprob.py --in-process; fi
}

stage_round() {
    if [ $SMOKE = 1 ]; then bench bench/bench_round.py --in-process --device cpu --smoke
    else bench bench/bench_round.py --in-process; fi
}

stage_dist() {
    local extra=()
    [ $SMOKE = 1 ] && extra=(--device cpu --smoke)
    # shellcheck disable=SC2086
    timeout -s INT -k 10 $((SLICE + 20)) $PY bench/bench_dist.py --out "$WORK" --budget "$SLICE" "${extra[@]}" \
        ${BENCH_DIST_ARGS:-} 2>&1 \
        | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# The exact on-policy mode's round cost, on against off (bench/bench_exact.py; Triton kernels on CUDA).
stage_exact() {
    local args=(--device cuda --shape qwen2.5-0.5b --precisions bf16-mixed --configs plain,ppo --rounds 4)
    [ $SMOKE = 1 ] && args=(--device cpu --shape tiny --precisions fp32 --configs ppo --rounds 2)
    timeout -s INT -k 10 $((SLICE + 20)) $PY bench/bench_exact.py "${args[@]}" 2>&1 | tee -a "$LOG" "$WORK/exact.md"
    return "${PIPESTATUS[0]}"
}

# LoRA (bench/bench_lora.py): one L0 round of a random-weight Qwen2.5-7B shape with r = 16 adapters (peak memory
# and time), then batch-256 decode with adapters on every projection against none (inside the CUDA graphs).
stage_lora() {
    local round=(round --device cuda --shape qwen2.5-7b --response 256) decode=(decode --device cuda --shape
        qwen2.5-1.5b --precision bf16-mixed --batch 256 --new-tokens 128 --repeats 3)
    if [ $SMOKE = 1 ]; then
        round=(round --device cpu --shape tiny --response 8)
        decode=(decode --device cpu --shape tiny --batch 8 --new-tokens 8 --repeats 1)
    fi
    timeout -s INT -k 10 $((SLICE * 2 / 3 + 10)) $PY bench/bench_lora.py "${round[@]}" 2>&1 | tee -a "$LOG" "$WORK/lora.md"
    local rc=${PIPESTATUS[0]}
    timeout -s INT -k 10 $((SLICE / 3 + 10)) $PY bench/bench_lora.py "${decode[@]}" 2>&1 | tee -a "$LOG" "$WORK/lora.md"
    [ "$rc" = 0 ] && return "${PIPESTATUS[0]}"
    return "$rc"
}

stage_rollout() {
    if [ $SMOKE = 1 ]; then bench bench/bench_rollout.py --in-process --device cpu --smoke
    else bench bench/bench_rollout.py --in-process --shapes qwen2.5-1.5b; fi
}

# fastrft against TRL's GRPOTrainer (bench/bench_trl.py); trl and datasets come from .whl/.
stage_trl() {
    local why
    if ! why=$($PY -c 'import trl, datasets' 2>&1); then
        why=$(echo "$why" | tail -n 1)
        printf '_not run_: trl and datasets are not importable (%s); carry their wheels in .whl/ (see the header)\n' \
            "$why" >"$WORK/trl.md"
        say "stage trl: trl and datasets are not importable: $why"
        return 1
    fi
    # shellcheck disable=SC2086
    if [ $SMOKE = 1 ]; then bench bench/bench_trl.py --device cpu --smoke ${BENCH_TRL_ARGS:-}
    else bench bench/bench_trl.py ${BENCH_TRL_ARGS:-}; fi
}

# ------------------------------------------------------------------------------------------ main
say "fastrft GPU suite into $OUT_DIR (budget $BUDGET s$([ $SMOKE = 1 ] && echo ', cpu-smoke'))"
if ! setup; then
    say "setup failed; see $LOG"
    printf 'setup\tfailed\t%s\t-\n' "$(elapsed)" >>"$WORK/stages.tsv"
    finish
    exit 3
fi
declare -A SHARE=([tests]=22 [logprob]=35 [round]=50 [rollout]=100 [dist]=60 [trl]=50 [exact]=40 [lora]=50)
IFS=, read -r -a ORDER <<<"$STAGES"
for i in "${!ORDER[@]}"; do
    name=${ORDER[$i]}
    [ -n "${SHARE[$name]:-}" ] || { say "unknown stage '$name' (tests, logprob, round, rollout, dist, trl, exact, lora)"; continue; }
    pct=${SHARE[$name]}
    [ "$i" -eq $((${#ORDER[@]} - 1)) ] && pct=100
    stage "$name" "$pct" "stage_$name"
done
info "elapsed: $(elapsed) s of $BUDGET s"
finish
say "done in $(elapsed) s: $OUT_DIR/summary.md"
exit $FAILED
