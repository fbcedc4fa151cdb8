"""Environment steps per second of the batched evaluation against a one-env-at-a-time loop, same policy.

    python benchmark/eval_speed.py                      # Meta-World (llmdpd_metaworld.evaluate)
    python benchmark/eval_speed.py --script d4rl        # Hopper-v5 (llmdpd_d4rl.evaluate)

The policy is a freshly initialised LLMDPD agent (the cost of acting does not depend on training): both prompts
on, `--candidates` actions sampled per state and picked by Q, as at evaluation. The batched loop steps all
`--episodes` environments with one policy call per step; the baseline calls the policy once per env per step.
"""
import argparse
import importlib.util
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", choices=["metaworld", "d4rl"], default="metaworld")
    parser.add_argument("--task", default="box-close", help="Meta-World task (with --script metaworld)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--max-episode-steps", type=int, default=100, help="Meta-World episode length for the timing")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    path = os.path.join(HERE, "..", f"llmdpd_{options.script}.py")
    spec = importlib.util.spec_from_file_location("llmdpd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    device = torch.device("cpu")
    if options.script == "metaworld":
        args = module.Args(eval_episodes=options.episodes, eval_candidates=options.candidates,
                           max_episode_steps=options.max_episode_steps)
        obs_dim, act_dim = module.OBS_DIM, module.ACT_DIM
    else:
        args = module.Args(env_id="Hopper-v5", eval_episodes=options.episodes, eval_candidates=options.candidates)
        obs_dim, act_dim = 11, 3
    llm_features, trajectory = torch.randn(576), torch.randn(args.traj_prompt_len, obs_dim + act_dim)
    agent = module.Agent(obs_dim, act_dim, llm_features[None], args, device)
    agent.policy.eval()

    def run(n_parallel):
        start = time.perf_counter()
        if options.script == "metaworld":
            result = module.evaluate(agent, options.task, llm_features, trajectory, args, device, n_parallel)
        else:
            result = module.evaluate(agent, llm_features, trajectory, args, device, n_parallel)
        return result["env_steps"] / (time.perf_counter() - start)

    run(None), run(1)  # warm-up: builds the environments (Meta-World keeps them for the run)
    batched, single = run(None), run(1)
    print(f"{options.script} eval, {options.episodes} episodes, {options.candidates} candidates, {options.threads} thread(s):")
    print(f"  batched            {batched:8.1f} env steps/s")
    print(f"  one env at a time  {single:8.1f} env steps/s")
    print(f"  speed-up           {batched / single:8.2f}x")


if __name__ == "__main__":
    main()
