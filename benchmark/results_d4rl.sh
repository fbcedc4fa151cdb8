#!/usr/bin/env bash
# The paper's D4RL comparison (Table 2) at a budget of our choosing: LLMDPD against plain Diffusion-QL (the same
# script with both prompts off) at equal steps, on D4RL-layout medium-replay files found in DATA_DIR
# (halfcheetah-medium-replay-*.hdf5, hopper-..., walker2d-...).
#   bash benchmark/results_d4rl.sh DATA_DIR [STEPS] [SEEDS...]     (default: 100000 steps, seeds 1 2 3)
set -euo pipefail
data_dir=${1:?usage: bash benchmark/results_d4rl.sh DATA_DIR [STEPS] [SEEDS...]}
steps=${2:-100000}
shift 2 || shift $#
seeds=${*:-1 2 3}
for seed in $seeds; do
  for env in HalfCheetah Hopper Walker2d; do
    file=$(ls "$data_dir"/"${env,,}"-medium-replay-*.hdf5 | head -n 1)
    python llmdpd_d4rl.py --env-id "$env-v5" --dataset-path "$file" --seed "$seed" --total-steps "$steps" --exp-name llmdpd
    python llmdpd_d4rl.py --env-id "$env-v5" --dataset-path "$file" --seed "$seed" --total-steps "$steps" \
      --exp-name diffusion-ql --no-text-prompt --no-traj-prompt --no-critic-prompt
  done
done
python benchmark/collect_results.py --runs runs --out results
