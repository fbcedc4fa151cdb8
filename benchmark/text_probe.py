"""Does the LLM's text-prompt feature carry a goal stated in words, to goals it was not fitted on?

    python benchmark/text_probe.py                       # the embedded SmolLM2, offline
    python benchmark/text_probe.py --llm /path/to/model  # any model llmdpd_metaworld.py takes

The text prompts of `--task`'s variations (`reach@0` ... `reach@49`) with `--goal-in-text`, one phrasing of the goal
sentence at a time, go through the script's own Eq. 1 path (the LLM, mean pooling, the disk cache, then the
centring and scaling of `--text-feature-norm` on the seen goals). A linear probe (ridge regression, its strength
chosen by leave-one-out on the seen goals only) is fitted from the features of the seen goals (`--n-seen`, the
first ones) to their goal positions, and tested on the others: held-out R^2 per axis, the error in cm, and how many
unseen goals it places within 5 cm (reach's success radius). Phrasing `none` leaves the goal out (the control: every
prompt is the same, so R^2 is at most 0). The script's `goal_in_words` is the phrasing named `script`.

    python benchmark/text_probe.py --random-init /tmp/smollm2-random   # what pretraining adds: the same model, random

`--random-init DIR` saves `--llm`'s architecture and tokenizer with freshly initialised weights (seed 0) in DIR and
probes that: what the prompt's tokens carry without any pretraining. DIR is a model folder that
`llmdpd_metaworld.py --llm DIR` takes too, for the same control on the policy.
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("llmdpd_metaworld", os.path.join(HERE, "..", "llmdpd_metaworld.py"))
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
goal_in_words = script.goal_in_words  # the script's phrasing, before the probe swaps in others


def goal_and_region(task: str):
    """The variation's goal position and the box its task draws goals from, as the script reads them."""
    env_class, (variation,) = script.task_variations(task, script.VARIATIONS_SEED)
    env = env_class()
    env.set_task(variation)
    return env.reset()[0][script.GOAL], env.goal_space.low, env.goal_space.high


def in_words(goal, low, high):
    fraction = np.clip((goal - low) / np.maximum(high - low, 1e-6), 0, 0.999)
    return (("far left", "left", "centre", "right", "far right")[int(fraction[0] * 5)],
            ("near", "middle distance", "far")[int(fraction[1] * 3)],
            ("low", "middle height", "high")[int(fraction[2] * 3)])


PHRASINGS = {
    "none": None,
    "metres": lambda g, lo, hi: f"The goal position is x = {g[0]:.2f}, y = {g[1]:.2f}, z = {g[2]:.2f} metres.",
    "centimetres": lambda g, lo, hi: "The goal is " + ", ".join(
        f"{round(100 * o):+d} cm along {a}" for o, a in zip(g - (lo + hi) / 2, "xyz")) + " from the middle of the goal region.",
    "words": lambda g, lo, hi: "The goal is " + ", ".join(in_words(g, lo, hi)) + ".",
    "words+centimetres": lambda g, lo, hi: "The goal is " + ", ".join(in_words(g, lo, hi)) + ": " + ", ".join(
        f"{round(100 * o):+d} cm along {a}" for o, a in zip(g - (lo + hi) / 2, "xyz")) + " from the middle of the goal region.",
    "script": "script",
}


def ridge_probe(seen_x, seen_y, unseen_x, alphas=10.0 ** np.arange(-4, 5)):
    """Kernel ridge (linear kernel) with an intercept; alpha by the closed-form leave-one-out error on the seen rows."""
    x_mean, y_mean = seen_x.mean(0), seen_y.mean(0)
    seen_x, unseen_x, seen_y = seen_x - x_mean, unseen_x - x_mean, seen_y - y_mean
    gram = seen_x @ seen_x.T
    best = None
    for alpha in alphas:
        hat = gram @ np.linalg.inv(gram + alpha * np.eye(len(gram)))
        loo = (((seen_y - hat @ seen_y) / (1 - np.diag(hat))[:, None]) ** 2).mean()
        if best is None or loo < best[0]:
            best = (loo, alpha)
    dual = np.linalg.solve(gram + best[1] * np.eye(len(gram)), seen_y)
    return unseen_x @ seen_x.T @ dual + y_mean, best[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=script.EMBEDDED_LLM)
    parser.add_argument("--task", default="reach")
    parser.add_argument("--n-seen", type=int, default=40, help="variations 0..n-1 are fitted on, the rest tested")
    parser.add_argument("--phrasings", nargs="+", default=list(PHRASINGS), choices=list(PHRASINGS))
    parser.add_argument("--no-hide-goal", action="store_true", help="the Observations line as without --hide-goal")
    parser.add_argument("--embedding-cache-dir", default=script.Args.embedding_cache_dir)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--random-init", metavar="DIR", help="probe --llm's architecture with random weights, saved in DIR")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.random_init:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source, kwargs = script.resolve_llm(options.llm)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(source, **kwargs)).save_pretrained(options.random_init)
        AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(options.random_init)
        options.llm = options.random_init
    tasks = [f"{options.task}@{k}" for k in range(script.N_VARIATIONS)]
    seen, unseen = slice(0, options.n_seen), slice(options.n_seen, None)
    goals = {task: goal_and_region(task) for task in tasks}
    positions = np.array([goals[task][0] for task in tasks], dtype=np.float64)
    args = script.Args(goal_in_text=True, hide_goal=not options.no_hide_goal)
    print(f"{options.task}: {options.n_seen} seen -> {len(tasks) - options.n_seen} unseen goals, LLM {options.llm}\n")
    print(f"{'phrasing':<19}{'R^2 x':>8}{'R^2 y':>8}{'R^2 z':>8}{'error cm':>10}{'within 5 cm':>13}{'alpha':>9}"
          f"{'   10-fold R^2 x/y/z':>22}{'cm':>6}{'<5cm':>7}   example")
    for name in options.phrasings:
        phrase = PHRASINGS[name]
        if phrase is None:
            script.goal_in_words = lambda task: ""
        elif phrase == "script":
            script.goal_in_words = goal_in_words
        else:
            script.goal_in_words = lambda task, phrase=phrase: phrase(*goals[task])
        prompts = [script.build_text_prompt(task, args) for task in tasks]
        start = time.time()
        features, _ = script.llm_text_features(prompts, options.llm, options.embedding_cache_dir,
                                               torch.device("cpu"), "float32")
        features = features.double().numpy()
        # --text-feature-norm as the script's TextHead does it: centred on the seen goals' mean, scaled to unit RMS
        features = features - features[seen].mean(0)
        features = features / max(np.sqrt((features[seen] ** 2).mean()), 1e-6)

        def r2(predicted, true):
            return 1 - ((predicted - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)

        predicted, alpha = ridge_probe(features[seen], positions[seen], features[unseen])
        errors_cm = 100 * np.linalg.norm(predicted - positions[unseen], axis=1)
        folds = np.array_split(np.random.default_rng(0).permutation(len(tasks)), 10)  # all 50 goals, 10 folds
        pooled = np.zeros_like(positions)
        for fold in folds:
            train = np.setdiff1d(np.arange(len(tasks)), fold)
            pooled[fold] = ridge_probe(features[train], positions[train], features[fold])[0]
        pooled_cm = 100 * np.linalg.norm(pooled - positions, axis=1)
        example = script.goal_in_words(tasks[0])
        print(f"{name:<19}" + "".join(f"{value:>8.2f}" for value in r2(predicted, positions[unseen]))
              + f"{np.median(errors_cm):>10.1f}{f'{(errors_cm < 5).sum()}/{len(errors_cm)}':>13}{alpha:>9.0e}"
              + f"{' / '.join(f'{v:.2f}' for v in r2(pooled, positions)):>22}{np.median(pooled_cm):>6.1f}"
              + f"{f'{(pooled_cm < 5).sum()}/{len(tasks)}':>7}   {example[:70]!r} ({time.time() - start:.0f}s)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
