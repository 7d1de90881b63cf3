#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py installs on a GPU machine that has torch, transformers, peft and
# accelerate but no network (Python 3.12, x86-64 Linux): run this where pip reaches PyPI, carry DIR
# over, then `python benchmarks/gpu_check.py --wheels DIR --out RESULTS`.
#
#   benchmarks/gpu_wheels.sh DIR            # ~44 MB: bitsandbytes (43 MB, CUDA 11.8-13.2 kernels) and
#                                           # Hydra + submitit, for a logger=none, eval=val run
#
# lm-eval and wandb stay out (the check runs logger=none with validation loss only), which keeps the
# folder well under 60 MiB. PYTHON_VERSION=3.11 (etc.) fetches for another interpreter.
set -euo pipefail
DIR=${1:?usage: benchmarks/gpu_wheels.sh DIR}
PY=${PYTHON:-python3}
PYV=${PYTHON_VERSION:-3.12}
mkdir -p "$DIR"

# The versions this checkout is tested with; --no-deps: each dependency the GPU image lacks is named.
BINARY=(
  bitsandbytes==0.50.2              # 4-bit QLoRA and paged 8-bit AdamW (needs torch, numpy, packaging: there)
  hydra-core==1.3.8                 # the `lorasweep` command (needs omegaconf, antlr4, packaging)
  omegaconf==2.3.1                  # (needs antlr4, PyYAML: there)
  submitit==1.5.4                   # launcher=parallel / submitit_local (needs cloudpickle, typing-extensions: there)
  hydra-submitit-launcher==1.2.0
)
SDIST_ONLY=(
  antlr4-python3-runtime==4.9.3     # Hydra's parser: PyPI has no wheel of 4.9.3; built here (pure Python)
)

for spec in "${BINARY[@]%% *}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "$spec"
done
for spec in "${SDIST_ONLY[@]%% *}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DIR" "$spec"
done

ls -l "$DIR"/*.whl
du -sh "$DIR"
