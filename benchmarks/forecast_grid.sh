#!/usr/bin/env bash
# Issue 27's check of the time forecast: four SmolLM2-135M LoRA runs on real Alpaca rows that differ in
# batch size, sequence length, rank and targets, each a fresh process, the forecast made before each run
# (the first from a probe, later ones from finished runs of a similar micro-batch, else a probe).
# Then the report's "forecast vs measured" table. Run it alone on the machine (timings).
#   bash benchmarks/forecast_grid.sh [results_dir]
set -euo pipefail
out=${1:-results/forecast_grid}
alpaca=${ALPACA:-../shared/data/alpaca/alpaca_5000.json}
common=(model=smollm2_135m data=alpaca "data.path=$alpaca" data.max_train_examples=400 data.max_val_examples=32 logger=none eval=val
        train.max_steps=30 "results_dir=$out" study=grid train.save_adapter=false)
lorasweep "${common[@]}" train.batch_size=4 train.max_seq_len=256 lora.r=8 'lora.targets=[qv]'
lorasweep "${common[@]}" train.batch_size=8 train.max_seq_len=128 lora.r=16 'lora.targets=[all_linear]'
lorasweep "${common[@]}" train.batch_size=2 train.max_seq_len=512 lora.r=4 'lora.targets=[qv]'
lorasweep "${common[@]}" train.batch_size=4 train.max_seq_len=256 lora.r=64 'lora.targets=[attention]'
lorasweep-report "$out/grid"
sed -n '/## Training time/,/^$/p;/## Training time/,/all runs/p' "$out/grid/summary.md" | head -12
