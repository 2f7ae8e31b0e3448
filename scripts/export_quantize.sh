#!/usr/bin/env bash
# The export guide's `sbatch scripts/export_quantize.sh`, now a driver for the workflow.
#
# Submit it as a small, long-running CPU job (it only schedules; the heavy steps become their own
# SLURM jobs through profiles/slurm):
#   sbatch scripts/export_quantize.sh                  # the whole workflow for the best candidate
#   sbatch scripts/export_quantize.sh models/X-merged-gguf/model-q4_km.gguf   # one artifact
# Run it directly (bash scripts/export_quantize.sh) to drive the workflow from a login node.
#SBATCH --job-name=lora2gguf
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=24:00:00
#SBATCH --output=logs/slurm/lora2gguf-driver-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs/slurm
VENV="${VENV:-.venv}"
if [[ -x "$VENV/bin/snakemake" ]]; then
    export PATH="$(cd "$VENV/bin" && pwd):$PATH"
fi
exec snakemake --profile profiles/slurm "$@"
