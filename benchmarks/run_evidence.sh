#!/usr/bin/env bash
# The reference studies at their evidence scale (each study file's defaults: steps, seeds, arms),
# PAR runs at a time in fresh processes with one torch thread each, then lorasweep-report; the
# report, the exact command, the wall time and the package versions go to results/reference/<study>/.
#   benchmarks/run_evidence.sh seeds rank_alpha ...        (LORASWEEP_DATA: the data folder, ../shared/data)
#   PAR=1 benchmarks/run_evidence.sh qlora_vs_lora          (time is the finding: one run at a time)
# Extra overrides for one study: STUDY_ARGS_<study>="data.path=..." (e.g. the SST-2 folder).
# A study runs for an hour or more and its jobs import lorasweep afresh: run it from a clone you are
# not editing (git clone + its own venv), or moving a module mid-study fails the remaining runs.
set -u
cd "$(dirname "$0")/.."
OUT=${EVIDENCE_DIR:-results/evidence}
PAR=${PAR:-2}
export LORASWEEP_DATA=${LORASWEEP_DATA:-../shared/data}
mkdir -p "$OUT"
for study in "$@"; do
  var="STUDY_ARGS_${study}"
  extra=${!var:-}
  cmd="lorasweep sweep=$study logger=none launcher=parallel hydra.sweeper.max_batch_size=$PAR train.num_threads=1 results_dir=$OUT $extra"
  echo "[$(date -u +%H:%M:%S)] $study: $cmd"
  start=$(date +%s)
  # the code the runs used: taken now, not after the study (work may be committed meanwhile)
  commit="$(git rev-parse --short HEAD)$(git diff --quiet -- src conf sweeps || echo ' (with uncommitted changes to src/conf/sweeps)')"
  $cmd > "$OUT/$study.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  echo "[$(date -u +%H:%M:%S)] $study: exit $rc after ${wall}s"
  ref=results/reference/$study
  rm -rf "$ref" && mkdir -p "$ref"
  lorasweep-report "$OUT/$study" > "$OUT/$study.report.log" 2>&1 || echo "report failed: $OUT/$study.report.log"
  cp "$OUT/$study"/summary.md "$OUT/$study"/summary.csv "$OUT/$study"/arms.csv "$ref"/ 2>/dev/null
  cp "$OUT/$study"/trials.md "$OUT/$study"/trials.csv "$ref"/ 2>/dev/null  # a search study's trials
  cp "$OUT/$study"/*.png "$ref"/ 2>/dev/null
  {
    echo "# How this reference was made"
    echo
    echo '```'
    echo "LORASWEEP_DATA=$LORASWEEP_DATA $cmd"
    echo "lorasweep-report $OUT/$study"
    echo '```'
    echo
    echo "- finished $(date -u '+%Y-%m-%d %H:%M UTC'), sweep exit status $rc, wall time $((wall / 60)) min $((wall % 60)) s"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU; $PAR runs at a time, one torch thread each${EVIDENCE_NOTE:+; $EVIDENCE_NOTE}"
    echo "- git commit $commit"
    echo "- versions: $(python -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch","transformers","peft","bitsandbytes","lm_eval","optuna","hydra-core")))' 2>/dev/null)"
  } > "$ref/how.md"
done
