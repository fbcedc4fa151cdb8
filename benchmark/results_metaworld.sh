#!/usr/bin/env bash
# The paper's Meta-World comparison (Table 1, Table 3 ablations) at a budget of our choosing, same steps for all:
# LLMDPD against w/o-z_text, w/o-z_tau, w/o-prompt and pure diffusion BC (eta 0), over seeds, and LLMDPD with the
# one-step action approximation (Kang et al. 2023).
#   bash benchmark/results_metaworld.sh [STEPS] [SEEDS...]        (default: 20000 steps, seeds 1 2 3)
# Every run logs to runs/metaworld__<variant>__<seed>__*; then collect_results.py writes results/results.md and
# results/metaworld_curves.png. Runs are independent: start several at once with --threads 1 on a multi-core box.
set -euo pipefail
steps=${1:-20000}
shift || true
seeds=${*:-1 2 3}
for seed in $seeds; do
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name llmdpd
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name wo-prompt --no-text-prompt --no-traj-prompt
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name wo-text --no-text-prompt
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name wo-traj --no-traj-prompt
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name eta0-bc --eta 0
  python llmdpd_metaworld.py --seed "$seed" --total-steps "$steps" --exp-name one-step --one-step-action
done
python benchmark/collect_results.py --runs runs --out results
