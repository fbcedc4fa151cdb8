"""How cloneable is the offline data? A plain MLP behaviour cloner (MSE, task one-hot) on the Meta-World datasets that
`llmdpd_metaworld.py` collects, evaluated on the same MT1 task variations. A data recipe that this probe cannot
clone will not teach a diffusion policy either; it says nothing about LLMDPD itself.

    python benchmark/bc_probe.py                                 # the paper's 3 seen tasks, 30 episodes per level
    python benchmark/bc_probe.py --noise-levels 0.1 0.5 1.0 --episodes-per-level 10 --dataset-dir /tmp/old-recipe

Datasets are collected (and stored as Minari datasets, as the script does) if absent.
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llmdpd_metaworld as script  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tasks", nargs="+", default=["sweep-into", "coffee-push", "disassemble"])
    parser.add_argument("--noise-levels", nargs="+", type=float, default=list(script.Args.noise_levels))
    parser.add_argument("--episodes-per-level", type=int, default=30)
    parser.add_argument("--max-episode-steps", type=int, default=500)
    parser.add_argument("--dataset-dir", default=None, help="where the Minari datasets live (default: Minari's)")
    parser.add_argument("--steps", type=int, default=10_000, help="gradient steps, batch 256, Adam 3e-4")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    warnings.filterwarnings("ignore", message="Constant")
    if options.dataset_dir:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.path.expanduser(options.dataset_dir))
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    args = script.Args(train_tasks=tuple(options.train_tasks), noise_levels=tuple(options.noise_levels),
                       episodes_per_level=options.episodes_per_level, max_episode_steps=options.max_episode_steps,
                       hide_goal=False, goal_in_text=False, seed=options.seed)  # the goal visible, as the MLP sees it
    n_tasks, observations, actions = len(args.train_tasks), [], []
    for task_idx, task in enumerate(args.train_tasks):
        for episode in script.task_episodes(task, "train", args):
            one_hot = np.tile(np.eye(n_tasks)[task_idx], (len(episode.actions), 1))
            observations.append(np.concatenate([episode.observations[:-1], one_hot], axis=1))
            actions.append(episode.actions)
    observations = torch.as_tensor(np.concatenate(observations), dtype=torch.float32)
    actions = torch.as_tensor(np.concatenate(actions), dtype=torch.float32)
    width = 256
    cloner = nn.Sequential(nn.Linear(observations.shape[1], width), nn.Mish(), nn.Linear(width, width), nn.Mish(),
                           nn.Linear(width, width), nn.Mish(), nn.Linear(width, script.ACT_DIM), nn.Tanh())
    optimizer = torch.optim.Adam(cloner.parameters(), lr=3e-4)
    start = time.time()
    for _ in range(options.steps):
        index = torch.randint(0, len(observations), (256,))
        loss = ((cloner(observations[index]) - actions[index]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"MLP behaviour cloner: {len(observations)} transitions, {options.steps} steps, final MSE {loss.item():.4f} "
          f"({time.time() - start:.0f}s)")
    rates = []
    for task_idx, task in enumerate(args.train_tasks):  # the same episodes as the script's evaluation
        one_hot = np.eye(n_tasks)[task_idx]

        def policy_fn(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                inputs = np.concatenate([obs, np.tile(one_hot, (len(obs), 1))], axis=1)
                return cloner(torch.as_tensor(inputs, dtype=torch.float32)).numpy()

        result = script.run_episodes(task, policy_fn, options.eval_episodes, options.seed, args.max_episode_steps,
                                     options.eval_episodes)
        rates.append(result["success_rate"])
        print(f"  {task:<28} success {result['success_rate']:.2f}")
    print(f"  {'mean':<28} success {np.mean(rates):.2f}")


if __name__ == "__main__":
    main()
