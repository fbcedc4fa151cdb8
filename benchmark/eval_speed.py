"""Environment steps per second of the batched evaluation against a one-env-at-a-time loop, same policy.

    python benchmark/eval_speed.py                      # Meta-World (llmdpd_metaworld.evaluate)
    python benchmark/eval_speed.py --script d4rl        # Hopper-v5 (llmdpd_d4rl.evaluate)

The policy is a freshly initialised LLMDPD agent (the cost of acting does not depend on training): both prompts
on, `--candidates` actions sampled per state and picked by Q, as at evaluation. The batched loop steps all
`--episodes` environments with one policy call per step; the baseline calls the policy once per env per step.
For Meta-World it then times the parts (env.step, env.reset, a policy call for 1 and for `--episodes` states) and
prints the best speed-up that batching could reach: never below the MuJoCo time of each env step.
`--cuda` puts the policy on the GPU (the environments stay on the CPU, as in the scripts' evaluation).
"""
import argparse
import importlib.util
import os
import time

import numpy as np
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
    parser.add_argument("--cuda", action="store_true", help="policy on the GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the policy call (compiled in the warm-up runs)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    path = os.path.join(HERE, "..", f"llmdpd_{options.script}.py")
    spec = importlib.util.spec_from_file_location("llmdpd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    device = torch.device("cuda" if options.cuda else "cpu")
    if options.script == "metaworld":
        args = module.Args(eval_episodes=options.episodes, eval_candidates=options.candidates,
                           max_episode_steps=options.max_episode_steps)
        obs_dim, act_dim, task = module.OBS_DIM, module.ACT_DIM, options.task
    else:
        args = module.Args(env_id="Hopper-v5", eval_episodes=options.episodes, eval_candidates=options.candidates,
                           ref_min_score=0.0, ref_max_score=1.0)
        obs_dim, act_dim, task = 11, 3, "Hopper-v5"
    llm_features, trajectory = torch.randn(576), torch.randn(args.traj_prompt_len, obs_dim + act_dim)
    agent = module.Agent(obs_dim, act_dim, llm_features[None], args, device)
    if options.compile:
        agent.act = torch.compile(agent.act)
    with torch.no_grad():
        task_prompt = agent.policy.encode_prompts(llm_features.to(device)[None], trajectory.to(device)[None])
    env_steps, act = [0], agent.act

    def counting_act(obs, prompt):  # one row per environment step
        env_steps[0] += len(obs)
        return act(obs, prompt)

    agent.act = counting_act

    def run(n_parallel):
        env_steps[0], start = 0, time.perf_counter()
        module.evaluate(agent, args, task, task_prompt, device, n_parallel)
        return env_steps[0] / (time.perf_counter() - start)

    run(None), run(1)  # warm-up: builds the environments (Meta-World keeps them for the run); --compile compiles
    batched, single = run(None), run(1)
    print(f"{options.script} eval, {options.episodes} episodes, {options.candidates} candidates, {options.threads} thread(s), "
          f"policy on {device.type}{', compiled' if options.compile else ''}:")
    print(f"  batched            {batched:8.1f} env steps/s")
    print(f"  one env at a time  {single:8.1f} env steps/s")
    print(f"  speed-up           {batched / single:8.2f}x")
    if options.script == "metaworld":
        breakdown(module, act, task_prompt, options, args.seed, 1e3 / single, device)


def best_ms(fn, repeats: int = 5) -> float:
    """Best-of-`repeats` wall time of fn() in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def breakdown(module, act, task_prompts, options, seed: int, single_ms: float, device: torch.device):
    """Where the one-env loop's time per env step (`single_ms`) goes, and what batching can save of it: never the
    MuJoCo time (env.step plus its share of env.reset), and with many candidates not the policy's arithmetic."""
    vector_env, variations = module.evaluation_envs(options.task, options.episodes, 10_000_000 + seed)  # the run's own
    envs = [env.unwrapped for env in vector_env.envs]  # (in this process)
    for env, variation in zip(envs, variations):
        env.set_task(variation)
    reset_ms = best_ms(lambda: [env.reset() for env in envs]) / len(envs)
    actions = np.random.default_rng(0).uniform(-1, 1, (20, module.ACT_DIM)).astype(np.float32)
    step_ms = best_ms(lambda: [env.step(action) for env in envs for action in actions]) / (len(envs) * len(actions))
    act_ms = {}
    for n_states in (1, options.episodes):  # from host states to host actions, as each evaluation step does
        obs = np.random.default_rng(1).standard_normal((n_states, module.OBS_DIM)).astype(np.float32)

        def policy_call():
            return act(torch.as_tensor(obs, device=device), task_prompts).cpu().numpy()

        policy_call()
        act_ms[n_states] = best_ms(lambda: [policy_call() for _ in range(10)]) / 10
    mujoco_ms = step_ms + reset_ms / options.max_episode_steps
    batched_call_ms = act_ms[options.episodes] / options.episodes
    print(f"  where the time goes: env.step {step_ms:.3f} ms, env.reset {reset_ms:.1f} ms, policy call "
          f"{act_ms[1]:.2f} ms for 1 state and {act_ms[options.episodes]:.2f} ms for {options.episodes}")
    print(f"  one env at a time: {single_ms:.2f} ms per env step, of which MuJoCo (step + share of reset) "
          f"{mujoco_ms:.2f} ms")
    print(f"  bound on the speed-up: {single_ms / mujoco_ms:.1f}x if the policy call were free, "
          f"{single_ms / (mujoco_ms + batched_call_ms):.1f}x with this policy's batched call "
          f"({batched_call_ms:.2f} ms per state)")


if __name__ == "__main__":
    main()
