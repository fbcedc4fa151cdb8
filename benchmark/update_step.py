"""Gradient steps per second of LLMDPD's update step against a plain Diffusion-QL step.

    python benchmark/update_step.py --reference ../shared/bench/dql_ref_step.py

Both run at Meta-World dims (obs 39, act 4), batch 256, T=5, with the same thread count, interleaved in one
benchmark run (reference, ours, reference, ours, ...), each repeat in a fresh process; the median of the
repeats is reported, and the ratio of medians. Ours runs with both prompts on (3 seen tasks, a 576-d LLM
feature per task as SmolLM2 gives, 50-token trajectory prompts); `--variant` adds other flag sets.
`--cuda` runs ours on the GPU (replay buffer there too, as the script keeps it), each update replayed from a CUDA
graph as the script trains (the `-no-graph` variants launch every kernel from Python); the reference has no GPU
option, so it then stays on the CPU and no ratio is printed. `--profile N` first profiles N steps of each variant
and prints the busiest ops (and, on CUDA, the kernels per step and how busy the GPU is). The `-compile` variants
run with `--compile` (compiled during the 20 warm-up steps, which are not timed). `--phases` (CPU) also times the
parts of our step that every Diffusion-QL step has, whatever the policy's loss: the target actions and Q-values of
Eq. 6, and the critic update; what the rest of the step may take for a given ratio follows from them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "llmdpd_metaworld.py")

WORKER = r"""
import importlib.util, sys, time, json
import torch
spec = importlib.util.spec_from_file_location("llmdpd", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
steps, threads, flags, device = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), torch.device(sys.argv[5])
profile_steps, phase_steps = int(sys.argv[6]), int(sys.argv[7])
if threads: torch.set_num_threads(threads)
torch.manual_seed(0)
args = m.Args(**flags)
n_tasks, n = 3, 100_000
llm_features, trajectories = torch.randn(n_tasks, 576), torch.randn(n_tasks, args.traj_prompt_len, m.OBS_DIM + m.ACT_DIM)
torch.set_float32_matmul_precision("high")  # as the script sets it (TF32 matmuls on CUDA)
agent = m.Agent(m.OBS_DIM, m.ACT_DIM, llm_features if args.text_prompt else None, args, device)
llm_features, trajectories = llm_features.to(device), trajectories.to(device)
replay = dict(obs=torch.randn(n, m.OBS_DIM), actions=torch.rand(n, m.ACT_DIM) * 2 - 1, rewards=torch.randn(n),
              next_obs=torch.randn(n, m.OBS_DIM), not_done=torch.ones(n), task_idx=torch.randint(n_tasks, (n,)))
replay = {key: value.to(device) for key, value in replay.items()}
replay["task_start"] = [0, n // 3, 2 * n // 3, n]
update = m.update_function(agent, device)  # as the script trains: a CUDA-graph replay on CUDA, unless --no-cuda-graph
def train(first_step, n_steps):
    for step in range(first_step, first_step + n_steps):
        losses = update(m.sample_batch(replay, args.batch_size, False, agent.python_rng), llm_features, trajectories)
        agent.after_update(step, llm_features, trajectories)
    losses.tolist()  # waits for the GPU's queue to drain
start = time.perf_counter()
train(0, 20)  # warm-up: lazy initialisation, the CUDA graph's recording, --compile's compilation
warmup_s = time.perf_counter() - start
start = time.perf_counter()
train(20, steps)
sps = steps / (time.perf_counter() - start)
if profile_steps:  # where a step's time goes: the busiest ops, and on CUDA how much of the wall time kernels run
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        train(20 + steps, profile_steps)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12))
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.device_time for e in kernels) / 1e3 / profile_steps
        print(f"per step: {len(kernels) / profile_steps:.0f} GPU kernels, {kernel_ms:.2f} ms of kernel time in a "
              f"{1e3 / sps:.2f} ms step: the GPU is busy {kernel_ms * sps / 10:.0f}% of the time")
phase_ms = {}
if phase_steps and agent.critic is not None:  # the parts of the step that do not depend on how the policy is trained
    import torch.nn.functional as F
    batch = m.sample_batch(replay, args.batch_size, False, agent.python_rng)  # one batch for the two parts
    obs, next_obs, task_idx = batch["obs"], batch["next_obs"], batch["task_idx"]
    critic_prompts = agent.critic_prompts(agent.policy.encode_prompts(llm_features, trajectories))  # detached
    def target():  # Eq. 6's target: the EMA policy's reverse chain and the target critics, without gradients
        with torch.no_grad():
            next_actions = agent.policy_ema(next_obs, agent.ema_prompts, task_idx)
            target_q1, target_q2 = agent.critic_target(next_obs, next_actions, critic_prompts, task_idx)
            batch["rewards"] + batch["not_done"] * args.gamma * torch.min(target_q1, target_q2)
    def critic():  # Eq. 6's regression of both critics, with its optimiser step
        q1, q2 = agent.critic(obs, batch["actions"], critic_prompts, task_idx)
        critic_loss = F.mse_loss(q1, batch["rewards"]) + F.mse_loss(q2, batch["rewards"])
        agent.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        if args.grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(agent.critic.parameters(), args.grad_norm)
        agent.critic_optimizer.step()
    next_step = iter(range(20 + steps + profile_steps, 10**9))
    def whole():  # as timed above, and as the reference's step: its batch drawn, its EMA update every 5 steps
        train(next(next_step), 1)
    rounds = {"step": [], "target": [], "critic": []}  # interleaved rounds, their median: noise hits all alike
    calls = max(1, phase_steps // 5)  # per round
    for _ in range(5):
        for name, phase in (("step", whole), ("target", target), ("critic", critic)):
            phase()
            start = time.perf_counter()
            for _ in range(calls):
                phase()
            rounds[name].append(1e3 * (time.perf_counter() - start) / calls)
    phase_ms = {name: sorted(values)[2] for name, values in rounds.items()}
print(json.dumps({"sps": sps, "warmup_s": warmup_s, "phase_ms": phase_ms}))
"""

VARIANTS = {
    "llmdpd": {},
    "llmdpd-one-step": {"one_step_action": True},
    "no-prompts": {"text_prompt": False, "traj_prompt": False},
    "no-prompts-one-step": {"text_prompt": False, "traj_prompt": False, "one_step_action": True},
    # what each prompt costs the one-step step: one part left out at a time
    "no-traj-prompt-one-step": {"traj_prompt": False, "one_step_action": True},
    "no-text-prompt-one-step": {"text_prompt": False, "one_step_action": True},
    "no-critic-prompt-one-step": {"critic_prompt": False, "one_step_action": True},
    "llmdpd-no-graph": {"cuda_graph": False},  # on CUDA: every kernel launched from Python (on the CPU: as llmdpd)
    "llmdpd-one-step-no-graph": {"one_step_action": True, "cuda_graph": False},
    "llmdpd-compile": {"compile": True},  # torch.compile'd parts, recorded in the CUDA graph on CUDA
    "llmdpd-one-step-compile": {"one_step_action": True, "compile": True},
}


def run_ours(flags: dict, steps: int, threads: int, device: str, profile_steps: int = 0, phases: bool = False) -> tuple:
    """Steps/s, the seconds its 20 warm-up steps took (compilation included), and with `phases` the ms per call of
    the whole step and of its target and critic parts."""
    out = subprocess.run([sys.executable, "-c", WORKER, SCRIPT, str(steps), str(threads), json.dumps(flags), device,
                          str(profile_steps), str(steps if phases else 0)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the {json.dumps(flags)} step failed:\n{out.stderr[-3000:]}")
    out = out.stdout
    *profile_report, result = out.strip().splitlines()
    if profile_steps:
        print("\n".join(profile_report), flush=True)
    result = json.loads(result)
    return result["sps"], result["warmup_s"], result["phase_ms"]


def run_reference(path: str, steps: int, threads: int) -> float:
    out = subprocess.run([sys.executable, os.path.basename(path), "--steps", str(steps), "--threads", str(threads)],
                         cwd=os.path.dirname(os.path.abspath(path)), capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="path of dql_ref_step.py (run from its own folder, never copied)")
    parser.add_argument("--variant", nargs="+", default=["llmdpd", "llmdpd-one-step"], choices=sorted(VARIANTS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="run ours on the GPU (the reference stays on the CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many more steps of each variant once and print where the time goes")
    parser.add_argument("--phases", action="store_true",
                        help="also time the parts of our step that any Diffusion-QL step has (the target actions and "
                             "Q-values, the critic update) and print what that leaves for the rest at a given ratio")
    options = parser.parse_args()
    device = "cuda" if options.cuda else "cpu"
    if options.phases and options.cuda:
        parser.error("--phases times eager parts against the whole step, which on CUDA is a graph replay: CPU only")
    if options.profile:
        for name in options.variant:
            print(f"--- profile of {name} on {device}, {options.threads[0]} thread(s)", flush=True)
            run_ours(VARIANTS[name], 20, options.threads[0], device, options.profile)
    for threads in options.threads:
        sps = {name: [] for name in (["reference"] if options.reference else []) + options.variant}
        warmup_s = {name: [] for name in options.variant}
        phase_ms = {name: [] for name in options.variant}
        for _ in range(options.repeats):
            if options.reference:
                sps["reference"].append(run_reference(options.reference, options.steps, threads))
            for name in options.variant:
                steps_per_s, seconds, phases = run_ours(VARIANTS[name], options.steps, threads, device,
                                                        phases=options.phases)
                sps[name].append(steps_per_s)
                warmup_s[name].append(seconds)
                phase_ms[name].append(phases)
        medians = {name: statistics.median(values) for name, values in sps.items()}
        for name, values in sps.items():
            # no ratio of our GPU step to the CPU reference: that compares machines, not steps
            compare = options.reference and not options.cuda
            ratio = f"  {medians[name] / medians['reference']:.2f}x reference" if compare else ""
            where = "cpu" if name == "reference" else device
            warmup = f"  warm-up {statistics.median(warmup_s[name]):.1f} s" if name in warmup_s else ""
            print(f"threads={threads} {where:<4} {name:<25} median {medians[name]:6.1f} steps/s  "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)}){ratio}{warmup}", flush=True)
        for name in options.variant if options.phases else ():
            if not phase_ms[name][0]:
                continue  # no critic (--eta 0): no target or critic part
            part = {key: statistics.median(run[key] for run in phase_ms[name]) for key in phase_ms[name][0]}
            shared = part["target"] + part["critic"]
            print(f"threads={threads} phases of {name}: whole step {part['step']:.1f} ms, of which the target actions "
                  f"and Q-values {part['target']:.1f} ms and the critic update {part['critic']:.1f} ms (medians)")
            print(f"threads={threads} phases of {name}: the rest (prompts, L_d, the Q-term, the policy's optimiser "
                  f"step, the target critics' and EMA updates, drawing the batch) takes {part['step'] - shared:.1f} ms", end="")
            if options.reference:  # Amdahl: what the rest may take for a ratio, if the shared parts stay as they are
                reference_ms = 1e3 / medians["reference"]
                print(f"; at the reference's {reference_ms:.1f} ms a step, 1.8x leaves {reference_ms / 1.8 - shared:.1f}"
                      f" ms for it, 1.0x {reference_ms - shared:.1f} ms", end="")
            print(flush=True)


if __name__ == "__main__":
    main()
