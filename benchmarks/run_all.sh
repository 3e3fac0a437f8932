#!/usr/bin/env bash
# Every benchmark, one after the other, each JSON into benchmarks/results/<date>/ (stdout) with its log
# beside it. Long (hours on 2 cores); every step resumes from its --out folder when rerun, and a step
# whose JSON already exists is skipped, so rerun after an interruption.
#
#   ./benchmarks/run_all.sh                      # all subjects
#   SUBJECTS=coral_top,teal_bag ./benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
day=${DAY:-$(date +%F)}
res=benchmarks/results/$day
mkdir -p "$res" out
subj=${SUBJECTS:+--subjects $SUBJECTS}
threads=${THREADS:-2}

step() {  # name, command...
  local name=$1; shift
  if [ -s "$res/$name.json" ]; then echo "skip $name (have $res/$name.json)"; return; fi
  echo "== $name: $*"
  start=$(date +%s)
  "$@" > "$res/$name.json.tmp" 2> "$res/$name.log"
  mv "$res/$name.json.tmp" "$res/$name.json"
  echo "   done in $(( $(date +%s) - start )) s"
}

step embedded_model python benchmarks/embedded_model.py --threads "$threads" --out out/bench_embedded
step quantization_quality python benchmarks/quantization.py --threads "$threads" --skip-sd --quality
step personalization python benchmarks/personalization.py --threads "$threads" $subj --out out/bench_personalization
step comparison python benchmarks/comparison.py $subj --threads "$threads" --resume --out out/bench_comparison
# the same comparison (its runs are reused) with every method's memory in the low-memory mode
step comparison_lowmem python benchmarks/comparison.py $subj --threads "$threads" --resume --memory-low-memory --out out/bench_comparison
step tuneqdm_interval python benchmarks/studies/tuneqdm_study.py --study interval $subj --threads "$threads"
step tuneqdm_experts python benchmarks/studies/tuneqdm_study.py --study experts $subj --threads "$threads"
step tuneqdm_mcsu python benchmarks/studies/tuneqdm_study.py --study mcsu $subj --threads "$threads"
step early_stopping python benchmarks/studies/early_stopping.py $subj --threads "$threads" --out out/bench_early_stopping
step personalization_memory python benchmarks/personalization_memory.py --threads 1 --low-memory
