"""Results table (markdown) and learning curves (PNG) from the TensorBoard logs of finished runs.

    python benchmark/collect_results.py --runs runs --out results

Runs are grouped by their `exp_name` (set it per variant, e.g. `--exp-name llmdpd`, `--exp-name wo-prompt`) and the
step of their final evaluation (runs of one variant that trained for different lengths get a row each; with
`--partial` all are cut to one step, so they share one); each group shows mean +- std over its seeds of that
evaluation. Meta-World runs give success rates per task and
the seen/unseen means; D4RL runs give the normalised score. Every number is read from the logs, none typed in.

The event files of every finished run that goes into the table are copied to OUT/logs/<run> (a few hundred KB a
run, no checkpoints), which is committed with the table, and OUT/logs is read along with --runs: so the table can
always be made again from logs, and a new run adds to the runs already tabulated. A run in both is read from --runs,
unless only the archived copy is finished (as while a run is extended with --resume). A section of OUT/results.md
that none of the runs read belongs to is kept as it was.

With `--partial`, runs still going (or stopped, to be continued with `--resume`) are tabulated too: every run of a
benchmark is cut at the last step that all of them have evaluated at, so the variants are compared at equal steps,
and the table says "partial".
"""
import argparse
import ast
import collections
import glob
import os
import shutil
import sys

import numpy as np


# What the paper reports (its Tables 1 and 2, LLMDPD after ~2M steps), drawn as a line on the plots
PAPER = {"metaworld": {"eval/seen_mean": 80.2, "eval/unseen_mean": 76.2}, "HalfCheetah-v5": {"eval/seen_mean": 57.3},
         "Hopper-v5": {"eval/seen_mean": 105.9}, "Walker2d-v5": {"eval/seen_mean": 102.2}}
TITLES = {"metaworld": "Meta-World, {split} tasks", "HalfCheetah-v5": "HalfCheetah medium-replay (stand-in)",
          "Hopper-v5": "Hopper medium-replay (stand-in)", "Walker2d-v5": "Walker2d medium-replay (stand-in)"}
MAX_TASK_COLUMNS = 10  # a Meta-World table with more tasks has a column per split (success, return), not per task
# Tags of logs written before the scripts shared their training loop, and what the loop calls them now
OLD_TAGS = {"eval/normalized_score": "eval/seen_mean", "eval/return/": "eval/mean_return/"}


def read_run(run_dir: str) -> tuple[dict, dict]:
    """A run's scalars {tag: [(step, value)]} and its arguments {name: value as logged}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for old, new in OLD_TAGS.items():
        for tag in [t for t in scalars if t == old or (old.endswith("/") and t.startswith(old))]:
            scalars.setdefault(new + tag[len(old):], scalars.pop(tag))
    if "hyperparameters/text_summary" not in events.Tags()["tensors"]:
        return scalars, {}
    table = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    return scalars, dict(row.strip("|").split("|", 1) for row in table.splitlines()[2:])


def benchmark(env: str, params: dict) -> tuple[str, str]:
    """The table section a run belongs to and its plot title ("{split}" stands for seen or unseen): the environment,
    and on Meta-World the protocol the run's tasks tell (the paper's split, goals of one task as tasks, ML45, ...)."""
    if env != "metaworld" or "train_tasks" not in params:
        return env, TITLES.get(env, env)
    seen, unseen = (ast.literal_eval(params[name]) for name in ("train_tasks", "test_tasks"))
    hidden = ", goal hidden" if params.get("hide_goal") == "True" else ""
    if len(seen) + len(unseen) <= MAX_TASK_COLUMNS and not hidden and not any("@" in task for task in seen + unseen):
        return env, TITLES[env]
    names = {task.partition("@")[0] for task in seen + unseen}
    if len(names) == 1 and all("@" in task for task in seen + unseen):
        name = names.pop()
        return (f"metaworld-ML1-{name}-{len(seen)}-{len(unseen)}",
                f"Meta-World {name}: {len(seen)} seen -> {len(unseen)} unseen goals{hidden}; {{split}} goals")
    return (f"metaworld-{len(seen)}-{len(unseen)}",
            f"Meta-World, {len(seen)} seen -> {len(unseen)} unseen tasks{hidden}; {{split}} tasks")


def final_tag(env: str) -> str:
    """The scalar a run's result is read from: the unseen-task mean on Meta-World, the (seen) normalised score on D4RL."""
    return "eval/unseen_mean" if env.startswith("metaworld") else "eval/seen_mean"


def seeds_cell(finals: list, decimals: int) -> str:
    """A table cell: mean +- std over seeds, the value alone for one seed (no spread from one), "-" for none."""
    if not finals:
        return "-"
    if len(finals) == 1:
        return f"{finals[0]:.{decimals}f}"
    return f"{np.mean(finals):.{decimals}f} ± {np.std(finals):.{decimals}f}"


def table_sections(lines: list) -> dict:
    """A markdown table's lines by section: heading ("### ...") -> its lines; "" -> the lines before the first."""
    sections, heading = {}, ""
    for line in lines:
        heading = line if line.startswith("### ") else heading
        sections.setdefault(heading, []).append(line)
    return sections


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs"], help="folders of run directories (OUT/logs is read too)")
    parser.add_argument("--out", default="results", help="folder for the markdown table and the PNG curves")
    parser.add_argument("--partial", action="store_true", help="include unfinished runs, all cut at a common step")
    parser.add_argument("--at-step", type=int, help="every run cut at this evaluation step (with --partial: the runs "
                        "still going too), e.g. a shorter default run's length; written to OUT/results-at-STEP.md")
    parser.add_argument("--last", type=int, default=3, help="tables of many tasks also give each split's success "
                        "averaged over each run's last LAST evaluations (one evaluation is noisy), and every seed's")
    options = parser.parse_args()
    archive = os.path.join(options.out, "logs")
    run_dirs = collections.defaultdict(list)  # run name -> the folders that hold it, those of --runs first
    for folder in [*options.runs, archive]:
        for run_dir in sorted(glob.glob(os.path.join(folder, "*__*__*__*"))):
            run_dirs[os.path.basename(run_dir)].append(run_dir)
    runs_read, to_archive, titles = [], [], {}  # (benchmark, exp_name, seed, scalars, params); (run name, folder)
    for name, folders in sorted(run_dirs.items()):
        env, exp_name, seed, _ = name.split("__")
        tag = final_tag(env)
        copies = []  # (folder, scalars) up to the first finished copy (a run being extended in runs/ is archived finished)
        for run_dir in folders:
            scalars, params = read_run(run_dir)
            copies.append((run_dir, scalars, params))
            finished = tag in scalars and "charts/SPS" in scalars and scalars[tag][-1][0] == scalars["charts/SPS"][-1][0]
            if finished:
                break
        if not finished:  # tabulated with --partial only, from the first copy
            run_dir, scalars, params = copies[0]
            if not (options.partial and tag in scalars):
                print(f"skipped {run_dir}: no final evaluation (still running, or stopped: continue it with --resume; "
                      "--partial tabulates it)")
                continue
        bench, titles[bench] = benchmark(env, params)
        runs_read.append((bench, exp_name, int(seed), scalars, params))
        if finished and os.path.abspath(run_dir) != os.path.abspath(os.path.join(archive, name)):
            to_archive.append((name, run_dir))  # only finished runs: an unfinished one may never finish
    partial_envs = set()
    for env in {env for env, *_ in runs_read} if options.partial or options.at_step else ():  # cut at a common step
        runs = [s for e, _, _, s, _ in runs_read if e == env]
        steps_in_common = set.intersection(*({step for step, _ in s[final_tag(env)]} for s in runs))
        common_step = options.at_step if options.at_step in steps_in_common else max(steps_in_common, default=None)
        if common_step is None or (options.at_step and common_step != options.at_step):
            at = f" at {options.at_step}" if options.at_step else ""
            sys.exit(f"error: the {env} runs have no evaluation step in common{at}; wait for their next evaluation")
        if any(step > common_step for s in runs for step, _ in s.get("charts/SPS", [])):
            partial_envs.add(env)
        for s in runs:
            for tag in list(s):
                s[tag] = [(step, value) for step, value in s[tag] if step <= common_step]
    for name, run_dir in to_archive:  # keep the logs with the table
        os.makedirs(os.path.join(archive, name), exist_ok=True)
        for event_file in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
            shutil.copy2(event_file, os.path.join(archive, name))
    groups = collections.defaultdict(list)  # (benchmark, exp_name, steps) -> [(seed, scalars)]
    for env, exp_name, seed, scalars, params in runs_read:
        for split, tasks in (("seen", params.get("train_tasks")), ("unseen", params.get("test_tasks"))):
            returns = [scalars.get(f"eval/mean_return/{task}") for task in ast.literal_eval(tasks or "()")]
            if returns and all(returns):  # the mean episode return over a split's tasks, at each evaluation
                scalars[f"eval/{split}_return"] = [(r[0][0], np.mean([v for _, v in r])) for r in zip(*returns)]
        groups[(env, exp_name, scalars[final_tag(env)][-1][0])].append((seed, scalars))
    os.makedirs(options.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for env in sorted({env for env, _, _ in groups}):
        names = sorted((name, steps) for e, name, steps in groups if e == env)  # (exp_name, steps)
        lengths = collections.defaultdict(list)  # exp_name -> the step counts of its rows
        for name, steps in names:
            lengths[name].append(steps)
        metaworld = env.startswith("metaworld")
        task_tags = sorted({t for key in names for _, s in groups[(env, *key)] for t in s
                            if t.startswith("eval/success_rate/")})
        many_tasks = len(task_tags) > MAX_TASK_COLUMNS
        tags = ((["eval/seen_return", "eval/unseen_return"] if many_tasks else task_tags)
                + ["eval/seen_mean", "eval/unseen_mean"]) if metaworld else ["eval/seen_mean"]
        header = ["variant", "seeds", "steps"] + [t.split("/")[-1] if metaworld else "normalized_score" for t in tags]
        if many_tasks:  # success averaged over the last evaluations, then the final and that average of every seed
            header += [f"{split}_mean, last {options.last} evals" for split in ("seen", "unseen")] + [
                f"unseen_mean per seed (last {options.last} evals)"]
        lines += [f"### {env}", ""]
        if options.at_step:
            lines += [f"Every run at its evaluation at step {options.at_step}.", ""]
        elif env in partial_envs:
            lines += ["Partial: some runs are still going; every run is shown at the last step all of them have "
                      "evaluated at.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        curve_tags = ["eval/seen_mean", "eval/unseen_mean"] if metaworld else ["eval/seen_mean"]
        figure, axes = plt.subplots(1, len(curve_tags), figsize=(6 * len(curve_tags), 4), squeeze=False)
        for name, steps in names:
            runs = groups[(env, name, steps)]
            cells = [name, ",".join(str(seed) for seed, _ in runs), str(steps)]
            for tag in tags:
                rate = metaworld and not tag.endswith("_return")
                finals = [100 * s[tag][-1][1] if rate else s[tag][-1][1] for _, s in runs if tag in s]
                cells.append(seeds_cell(finals, 1 if rate or not metaworld else 0))
            if many_tasks:
                last = {tag: [100 * np.mean([v for _, v in s[tag][-options.last:]]) for _, s in runs]
                        for tag in ("eval/seen_mean", "eval/unseen_mean")}
                cells += [seeds_cell(last["eval/seen_mean"], 1), seeds_cell(last["eval/unseen_mean"], 1), ", ".join(
                    f"{100 * s['eval/unseen_mean'][-1][1]:.0f} ({average:.0f})" for (_, s), average in
                    zip(runs, last["eval/unseen_mean"]))]
            lines.append("| " + " | ".join(cells) + " |")
            for axis, curve_tag in zip(axes[0], curve_tags):
                curves = [dict(s[curve_tag]) for _, s in runs if curve_tag in s]
                if not curves:
                    continue
                x = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed evaluated at
                y = np.array([[c[step] for step in x] for c in curves]) * (100 if metaworld else 1)
                label = f"{name}, {steps} steps" if len(lengths[name]) > 1 else name
                color = f"C{sorted(lengths).index(name)}"  # one colour per variant, its shorter runs dotted
                axis.plot(x, y.mean(0), marker="o", color=color, linestyle="-" if steps == max(lengths[name]) else ":",
                          label=f"{label}: mean of {len(curves)} seed{'s' * (len(curves) > 1)}")
                low, high = y.mean(0) - y.std(0), y.mean(0) + y.std(0)
                if metaworld:  # a rate stays in [0, 100]
                    low, high = low.clip(0, 100), high.clip(0, 100)
                axis.fill_between(x, low, high, color=color, alpha=0.2)
        for axis, curve_tag in zip(axes[0], curve_tags):
            if curve_tag in PAPER.get(env, {}):
                axis.axhline(PAPER[env][curve_tag], color="grey", linestyle="--", label="paper, LLMDPD (~2M steps)")
            if metaworld:
                axis.set_ylim(-2, 102)
            axis.set_xlabel("gradient steps")
            axis.set_ylabel({"eval/seen_mean": "success rate (%), mean over seen tasks", "eval/unseen_mean":
                             "success rate (%), mean over unseen tasks"}[curve_tag] if metaworld
                            else "D4RL normalised score")
            axis.set_title(titles[env].format(split=curve_tag.split("/")[1].split("_")[0])
                           .replace("; ", "\n") + "\nband: ±1 std over seeds", fontsize="medium")
            axis.legend(fontsize="small")
        return_tags = sorted({t for key in names for _, s in groups[(env, *key)] for t in s
                              if t.startswith("eval/mean_return/")})
        if metaworld and return_tags and not many_tasks:  # returns move before success rates do: a table of mean returns per task
            lines += ["", "Mean episode return:", "", "| " + " | ".join(["variant"] + [t.split("/")[-1] for t in
                      return_tags]) + " |", "|" + "---|" * (len(return_tags) + 1)]
            for name, steps in names:
                cells = [f"{name} ({steps} steps)" if len(lengths[name]) > 1 else name]
                for tag in return_tags:
                    finals = [s[tag][-1][1] for _, s in groups[(env, name, steps)] if tag in s]
                    cells.append(seeds_cell(finals, 0))
                lines.append("| " + " | ".join(cells) + " |")
        figure.tight_layout()
        plot = f"{env}_{'success_rate' if metaworld else 'normalised_score'}"
        plot += f"_at_{options.at_step}.png" if options.at_step else ".png"
        figure.savefig(os.path.join(options.out, plot), dpi=100)
        lines += ["", f"![{titles[env].format(split='seen and unseen')}: learning curves]({plot})", ""]
    table_path = os.path.join(options.out, f"results-at-{options.at_step}.md" if options.at_step else "results.md")
    sections = table_sections(lines)  # those made now, then the ones of the old table that no run read belongs to
    old_lines = open(table_path).read().splitlines() if os.path.exists(table_path) else []
    kept = {heading: old for heading, old in table_sections(old_lines).items() if heading not in sections}
    for heading in filter(None, kept):
        print(f"kept {heading[4:]!r} of {table_path} as it was: none of the runs read belongs to it")
    sections.update({heading: kept_lines + [""] * (kept_lines[-1] != "") for heading, kept_lines in kept.items()})
    lines = [line for heading in sorted(sections) for line in sections[heading]]
    with open(table_path, "w") as file:
        file.write("\n".join(lines).rstrip("\n") + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
