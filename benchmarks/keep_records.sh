#!/bin/bash
# Copy a study folder's run records (record.json, steps.jsonl, val_curve.jsonl, config.yaml, params.tsv;
# no adapters, checkpoints or W&B files) into results/reference/<study>/, so its report can be
# regenerated from the reference itself: lorasweep-report results/reference/<study>
#   benchmarks/keep_records.sh /work/evidence/lr_rank
set -euo pipefail
src=${1:?study folder}
dst=results/reference/$(basename "$src")
mkdir -p "$dst"
for run in "$src"/*/; do
  [ -f "$run/record.json" ] || continue
  out="$dst/$(basename "$run")"
  mkdir -p "$out"
  for f in record.json steps.jsonl val_curve.jsonl config.yaml params.tsv; do
    [ -f "$run/$f" ] && cp "$run/$f" "$out/$f"
  done
done
echo "kept $(ls -d "$dst"/*/ | wc -l) run records in $dst"
