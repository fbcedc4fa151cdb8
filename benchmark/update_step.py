"""Gradient steps per second of LLMDPD's update step against a plain Diffusion-QL step.

    python benchmark/update_step.py                        # against benchmark/diffusion_ql_step.py
    python benchmark/update_step.py --reference FILE       # against another reference step ("none": no reference)

Both run at Meta-World dims (obs 39, act 4), batch 256, T=5, with the same thread count, interleaved (reference,
ours, reference, ours, ...), each repeat in a fresh process; the median of the repeats is printed, and the ratio of
medians. Ours runs with both prompts on (`--tasks` seen tasks, 3 by default; a 576-d LLM feature per task as
SmolLM2 gives, 50-token trajectory prompts); `--variant` adds other flag sets. `--cuda` runs ours on the GPU (the
reference has no GPU option, so no ratio is printed then); the `-compile` and `-cudagraphs` variants are the
scripts' opt-in speed flags, compiled or recorded during the 20 warm-up steps, which are not timed. `--profile N`
prints the busiest ops of N more steps of each variant.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "llmdpd_metaworld.py")
REFERENCE = os.path.join(HERE, "diffusion_ql_step.py")

WORKER = r"""
import importlib.util, sys, time, json
import torch
spec = importlib.util.spec_from_file_location("llmdpd", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
steps, threads, flags, device, profile_steps = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), torch.device(sys.argv[5]), int(sys.argv[6])
if threads: torch.set_num_threads(threads)
torch.manual_seed(0)
args = m.Args(**flags)
n_tasks, n = int(sys.argv[7]), 100_000
llm_features = torch.randn(n_tasks, 576) if args.text_prompt else torch.zeros(n_tasks, 0)
trajectories = torch.randn(n_tasks, args.traj_prompt_len, m.OBS_DIM + m.ACT_DIM)
agent = m.Agent(m.OBS_DIM, m.ACT_DIM, llm_features, args, device)
llm_features, trajectories = llm_features.to(device), trajectories.to(device)
replay = dict(obs=torch.randn(n, m.OBS_DIM), actions=torch.rand(n, m.ACT_DIM) * 2 - 1, rewards=torch.randn(n),
              next_obs=torch.randn(n, m.OBS_DIM), not_done=torch.ones(n), task_idx=torch.randint(n_tasks, (n,)))
replay = {key: value.to(device) for key, value in replay.items()}
update = torch.compile(agent.update) if args.compile else agent.update  # as the scripts' training loop wraps it
update = m.cuda_graph(update) if args.cudagraphs else update
def train(first_step, n_steps):
    for step in range(first_step, first_step + n_steps):
        losses = update(m.sample_batch(replay, args, agent.python_rng), llm_features, trajectories)
        agent.update_ema(step)
    losses.tolist()  # waits for the GPU's queue to drain
start = time.perf_counter()
train(0, 20)  # warm-up: lazy initialisation, compilation, the CUDA graph's recording
warmup_s = time.perf_counter() - start
start = time.perf_counter()
train(20, steps)
sps = steps / (time.perf_counter() - start)
if profile_steps:
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        train(20 + steps, profile_steps)
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12))
print(json.dumps({"sps": sps, "warmup_s": warmup_s}))
"""

VARIANTS = {
    "llmdpd": {},
    "llmdpd-one-step": {"one_step_action": True},
    "no-prompts": {"text_prompt": False, "traj_prompt": False},
    "no-traj-prompt": {"traj_prompt": False},
    "no-text-prompt": {"text_prompt": False},
    "no-critic-prompt": {"critic_prompt": False},
    "llmdpd-compile": {"compile": True},
    "llmdpd-cudagraphs": {"cudagraphs": True},  # CUDA only
    "llmdpd-compile-cudagraphs": {"compile": True, "cudagraphs": True},  # CUDA only
}


def run_ours(flags: dict, steps: int, threads: int, device: str, profile_steps: int = 0, tasks: int = 3) -> tuple:
    out = subprocess.run([sys.executable, "-c", WORKER, SCRIPT, str(steps), str(threads), json.dumps(flags), device,
                          str(profile_steps), str(tasks)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the {json.dumps(flags)} step failed:\n{out.stderr[-3000:]}")
    *profile_report, result = out.stdout.strip().splitlines()
    if profile_steps:
        print("\n".join(profile_report), flush=True)
    result = json.loads(result)
    return result["sps"], result["warmup_s"]


def run_reference(path: str, steps: int, threads: int) -> float:
    out = subprocess.run([sys.executable, os.path.basename(path), "--steps", str(steps), "--threads", str(threads)],
                         cwd=os.path.dirname(os.path.abspath(path)), capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=REFERENCE,
                        help="the reference step, run from its own folder as `python FILE --steps N --threads T`; it "
                             "prints steps/s last (default: benchmark/diffusion_ql_step.py; 'none': no reference)")
    parser.add_argument("--variant", nargs="+", default=["llmdpd", "llmdpd-one-step"], choices=sorted(VARIANTS))
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: torch's default, as the scripts")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="run ours on the GPU (the reference stays on the CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="print the busiest ops of STEPS steps")
    parser.add_argument("--tasks", type=int, default=3, help="seen tasks whose prompts each step encodes (default run: 40)")
    options = parser.parse_args()
    device = "cuda" if options.cuda else "cpu"
    if options.reference.lower() == "none":
        options.reference = None
    if not options.cuda and any(VARIANTS[name].get("cudagraphs") for name in options.variant):
        parser.error("the -cudagraphs variants need --cuda")
    for name in options.variant if options.profile else ():
        print(f"--- profile of {name} on {device}, {options.threads[0]} thread(s)", flush=True)
        run_ours(VARIANTS[name], 20, options.threads[0], device, options.profile, options.tasks)
    for threads in options.threads:
        sps = {name: [] for name in (["reference"] if options.reference else []) + options.variant}
        warmup_s = {name: [] for name in options.variant}
        for _ in range(options.repeats):
            if options.reference:
                sps["reference"].append(run_reference(options.reference, options.steps, threads))
            for name in options.variant:
                steps_per_s, seconds = run_ours(VARIANTS[name], options.steps, threads, device, tasks=options.tasks)
                sps[name].append(steps_per_s)
                warmup_s[name].append(seconds)
        medians = {name: statistics.median(values) for name, values in sps.items()}
        for name, values in sps.items():
            compare = options.reference and not options.cuda  # a GPU step against the CPU reference compares machines
            ratio = f"  {medians[name] / medians['reference']:.2f}x reference" if compare else ""
            where = "cpu" if name == "reference" else device
            warmup = f"  warm-up {statistics.median(warmup_s[name]):.1f} s" if name in warmup_s else ""
            print(f"threads={threads or 'default'} {where:<4} {name:<26} median {medians[name]:6.1f} steps/s  "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)}){ratio}{warmup}", flush=True)


if __name__ == "__main__":
    main()
