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
paper_split=(--train-tasks sweep-into coffee-push disassemble --test-tasks box-close hand-insert bin-picking
             --no-hide-goal --no-goal-in-text --max-episode-steps 500 --episodes-per-level 30 --eval-episodes 10)
for seed in $seeds; do
  run=(python llmdpd_metaworld.py "${paper_split[@]}" --seed "$seed" --total-steps "$steps")
  "${run[@]}" --exp-name llmdpd
  "${run[@]}" --exp-name wo-prompt --no-text-prompt --no-traj-prompt
  "${run[@]}" --exp-name wo-text --no-text-prompt
  "${run[@]}" --exp-name wo-traj --no-traj-prompt
  "${run[@]}" --exp-name eta0-bc --eta 0
  "${run[@]}" --exp-name one-step --one-step-action
done
python benchmark/collect_results.py --runs runs --out results
