"""Two versions of the update step, A and B, timed in one process, interleaved: does a change (a variant, a speed
trick) make the whole step faster or slower? Alternating rounds cancel most of a shared machine's drift.

    git show 53fa879:llmdpd_metaworld.py > /tmp/before.py      # e.g. the script before issue 31
    python benchmark/ab_update_step.py /tmp/before.py llmdpd_metaworld.py --threads 2 --rounds 12

Each script's Agent at Meta-World dims (obs 39, act 4), both prompts, `--tasks` seen tasks, batch 256, random data,
from step 1000 (the EMA policy updates every 5 steps). Prints the median ms per step of each and every round's.
"""
import argparse
import importlib.util
import statistics
import time

import torch


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script_a")
    parser.add_argument("script_b")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--tasks", type=int, default=3, help="seen tasks whose prompts each step encodes")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    runs = {}
    for name, path in (("A", options.script_a), ("B", options.script_b)):
        module = load(path, f"script_{name}")
        torch.manual_seed(0)
        args = module.Args(train_tasks=tuple(f"t{k}" for k in range(options.tasks)))
        llm_features = torch.randn(options.tasks, 576)
        trajectories = torch.randn(options.tasks, args.traj_prompt_len, 43)
        agent = module.Agent(39, 4, llm_features, args, torch.device("cpu"))
        n = 100_000
        replay = dict(obs=torch.randn(n, 39), actions=torch.rand(n, 4) * 2 - 1, rewards=torch.randn(n),
                      next_obs=torch.randn(n, 39), not_done=torch.ones(n), task_idx=torch.randint(options.tasks, (n,)))
        # scripts before issue 31 call the EMA update after_update(step, llm_features, trajectories)
        ema = getattr(agent, "update_ema", None) or (lambda step, a=agent: a.after_update(step, llm_features, trajectories))
        runs[name] = dict(module=module, agent=agent, args=args, features=llm_features, trajectories=trajectories,
                          replay=replay, ema=ema, step=1000, times=[])

    def run(name: str, steps: int) -> float:
        r = runs[name]
        start = time.perf_counter()
        for _ in range(steps):
            r["agent"].update(r["module"].sample_batch(r["replay"], r["args"], r["agent"].python_rng), r["features"],
                              r["trajectories"])
            r["ema"](r["step"])
            r["step"] += 1
        return (time.perf_counter() - start) / steps * 1000

    for name in runs:  # warm-up
        run(name, 10)
    for round_index in range(options.rounds):
        for name in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
            runs[name]["times"].append(run(name, options.steps))
    for name, path in (("A", options.script_a), ("B", options.script_b)):
        times = runs[name]["times"]
        print(f"{name} {path}: median {statistics.median(times):.1f} ms/step, threads={options.threads or 'default'} "
              f"(rounds: {' '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
