"""The README's two commands and CI stay true to each other; the benchmark scripts run."""
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_run_and_test_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.index("```bash") < 200  # in the README's first lines
    run, test = readme_commands()[:2]
    assert run.endswith("python llmdpd_metaworld.py")
    assert "pytest" in test and test.startswith("pip install -r requirements.txt")


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert readme_commands()[1] in ci


def test_requirements_pin_torch_and_list_every_package():
    requirements = open(os.path.join(ROOT, "requirements.txt")).read().splitlines()
    assert "torch==2.13.0" in requirements
    for package in ("transformers", "gguf", "accelerate", "metaworld", "packaging", "minari", "tyro", "tensorboard",
                    "pytest", "h5py", "gymnasium", "mujoco"):
        assert any(line.startswith(package) for line in requirements), package


def test_collect_results_averages_finished_runs_and_skips_unfinished(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    def fake_run(name, seed, sweep_success, last_eval_step, last_train_step=2000):
        writer = SummaryWriter(str(tmp_path / "runs" / f"metaworld__{name}__{seed}__100"))
        for step in (1000, last_train_step):
            writer.add_scalar("charts/SPS", 20.0, step)
        for step in (1000, last_eval_step):
            writer.add_scalar("eval/success_rate/sweep-into", sweep_success, step)
            writer.add_scalar("eval/seen_mean", sweep_success, step)
            writer.add_scalar("eval/unseen_mean", 0.0, step)
        writer.close()

    def collect(out, *flags):
        return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "collect_results.py"), "--runs",
                               str(tmp_path / "runs"), "--out", str(tmp_path / out), *flags], capture_output=True, text=True)

    fake_run("llmdpd", 1, 0.2, 2000)
    fake_run("llmdpd", 2, 0.4, 2000)
    fake_run("llmdpd", 3, 1.0, 1000)  # still training: its last evaluation is not at its last step
    fake_run("llmdpd", 4, 0.6, 3000, last_train_step=3000)  # a finished run of another length: a row of its own
    result = collect("results")
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "metaworld__llmdpd__3__100" in result.stdout
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| llmdpd | 1,2 | 2000 | 30.0 ± 10.0 | 30.0 ± 10.0 | 0.0 ± 0.0 |" in table
    assert "| llmdpd | 4 | 3000 | 60.0 | 60.0 | 0.0 |" in table
    assert (tmp_path / "results" / "metaworld_success_rate.png").stat().st_size > 0

    # --at-step: every finished run cut at that evaluation, in a table of its own
    before = (tmp_path / "results" / "results.md").read_text()
    result = collect("results", "--at-step", "1000")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "results" / "results-at-1000.md").read_text()
    assert "Every run at its evaluation at step 1000." in table, table
    assert "| llmdpd | 1,2,4 | 1000 | 40.0 ± 16.3 | 40.0 ± 16.3 | 0.0 ± 0.0 |" in table, table
    assert (tmp_path / "results" / "results.md").read_text() == before

    # --partial: the run still going is kept, and every run is cut at the last step all three evaluated at
    result = collect("partial", "--partial")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "partial" / "results.md").read_text()
    assert "Partial:" in table
    assert "| llmdpd | 1,2,3,4 | 1000 | 55.0 ± 29.6 | 55.0 ± 29.6 | 0.0 ± 0.0 |" in table, table
    assert sorted(p.name for p in (tmp_path / "partial" / "logs").iterdir()) == [
        f"metaworld__llmdpd__{seed}__100" for seed in (1, 2, 4)]  # an unfinished run's logs are not kept

    # the logs of the tabulated runs are kept beside the table and read from there once runs/ is gone; a section of
    # the table that no run belongs to (one whose logs are lost) is kept as it was
    archived = sorted(p.name for p in (tmp_path / "results" / "logs").iterdir())
    assert archived == [f"metaworld__llmdpd__{seed}__100" for seed in (1, 2, 4)]
    assert all(list((tmp_path / "results" / "logs" / name).glob("events.out.tfevents.*")) for name in archived)
    table = (tmp_path / "results" / "results.md").read_text()
    (tmp_path / "results" / "results.md").write_text("Notes before the first heading.\n\n" + table + "### Hopper-v5, "
                                                     "from logs no longer at hand\n\n| variant | normalized_score |\n| x | 1.0 |\n")
    shutil.rmtree(tmp_path / "runs")
    fake_run("wo-prompt", 1, 0.8, 2000)
    # seed 1 being extended with --resume: its copy in runs/ has a second event file and no final evaluation yet
    shutil.copytree(tmp_path / "results" / "logs" / "metaworld__llmdpd__1__100", tmp_path / "runs" / "metaworld__llmdpd__1__100")
    writer = SummaryWriter(str(tmp_path / "runs" / "metaworld__llmdpd__1__100"))
    writer.add_scalar("charts/SPS", 20.0, 2500)
    writer.close()
    result = collect("results")
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stdout  # the archived, finished copy of seed 1 is read
    table = (tmp_path / "results" / "results.md").read_text()
    assert table.startswith("Notes before the first heading.\n\n###")
    assert "| llmdpd | 1,2 | 2000 | 30.0 ± 10.0 | 30.0 ± 10.0 | 0.0 ± 0.0 |" in table
    assert "| wo-prompt | 1 | 2000 | 80.0 | 80.0 | 0.0 |" in table
    assert "### Hopper-v5, from logs no longer at hand\n\n| variant | normalized_score |\n| x | 1.0 |\n\n###" in table
    assert table.count("### metaworld") == 1 and "kept 'Hopper-v5, from logs" in result.stdout

    # goals of one task as tasks (reach@k) get a section of their own, with the mean return of each split
    writer = SummaryWriter(str(tmp_path / "runs" / "metaworld__ml1__1__100"))
    seen, unseen = tuple(f"reach@{k}" for k in range(11)), ("reach@11", "reach@12")
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|train_tasks|{seen}|\n|test_tasks|{unseen}|\n|hide_goal|True|")
    for step in (1000, 2000):
        writer.add_scalar("charts/SPS", 20.0, step)
        for task in seen + unseen:
            writer.add_scalar(f"eval/success_rate/{task}", 0.5, step)
            writer.add_scalar(f"eval/mean_return/{task}", 100.0 if task in seen else 10.0 * step / 1000, step)
        writer.add_scalar("eval/seen_mean", 0.5, step)
        writer.add_scalar("eval/unseen_mean", 0.25 if step == 2000 else 0.15, step)
    writer.close()
    result = collect("results")
    table = (tmp_path / "results" / "results.md").read_text()
    assert "### metaworld-ML1-reach-11-2\n" in table and table.count("### metaworld\n") == 1
    assert ("| variant | seeds | steps | seen_return | unseen_return | seen_mean | unseen_mean | seen_mean, last 3 evals "
            "| unseen_mean, last 3 evals | unseen_mean per seed (last 3 evals) |") in table
    assert "| ml1 | 1 | 2000 | 100 | 20 | 50.0 | 25.0 | 50.0 | 20.0 | 25 (20) |" in table
    assert (tmp_path / "results" / "metaworld-ML1-reach-11-2_success_rate.png").stat().st_size > 0


def test_eval_speed_benchmark_prints_speed_up_and_its_bound():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "eval_speed.py"), "--episodes", "2",
                          "--max-episode-steps", "5", "--candidates", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    speed_up = float(re.search(r"speed-up\s+([\d.]+)x", out.stdout).group(1))
    free, batched = map(float, re.search(r"bound on the speed-up: ([\d.]+)x .* ([\d.]+)x with", out.stdout).groups())
    assert speed_up > 0 and free >= batched > 0


def test_update_step_benchmark_prints_steps_per_second_and_a_profile():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "update_step.py"), "--variant", "llmdpd",
                          "no-prompts", "--threads", "1", "--steps", "2", "--repeats", "1", "--profile", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--- profile of llmdpd on cpu" in out.stdout and "aten::addmm" in out.stdout  # the busiest ops
    for variant in ("llmdpd", "no-prompts"):
        assert float(re.search(rf"threads=1 cpu  {variant}\s+median\s+([\d.]+) steps/s", out.stdout).group(1)) > 0


def test_diffusion_ql_reference_step_prints_steps_per_second_last():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "diffusion_ql_step.py"), "--steps", "3",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) > 0  # update_step.py's run_reference parses the last token


def test_forking_example_applies_and_trains(tmp_path):
    """docs/forking.md's diff applies to the current llmdpd_metaworld.py, and the patched copy trains: its projection
    changes the policy's step, and off it is the script's own update."""
    import torch

    from conftest import load_script

    text = open(os.path.join(ROOT, "docs", "forking.md")).read()
    diff = text.split("```diff\n", 1)[1].split("```", 1)[0]
    (tmp_path / "fork.diff").write_text(diff)
    shutil.copy(os.path.join(ROOT, "llmdpd_metaworld.py"), tmp_path / "llmdpd_metaworld.py")
    result = subprocess.run(["git", "apply", "fork.diff"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, "docs/forking.md's diff no longer applies: " + result.stderr
    fork, script = load_script(str(tmp_path / "llmdpd_metaworld")), load_script("llmdpd_metaworld")
    weights = {}
    for name, module, flags in (("fork", fork, {}), ("fork-off", fork, {"grad_projection": False}), ("script", script, {})):
        torch.manual_seed(0)
        args = module.Args(hidden_dim=32, prompt_dim=8, traj_prompt_len=6, traj_d_model=16, **flags)
        llm_features, trajectories = torch.randn(2, 12), torch.randn(2, 6, 7)
        agent = module.Agent(5, 2, llm_features, args, torch.device("cpu"))
        batch = dict(obs=torch.randn(64, 5), actions=torch.rand(64, 2) * 2 - 1, rewards=torch.randn(64),
                     next_obs=torch.randn(64, 5), not_done=torch.ones(64), task_idx=torch.randint(2, (64,)))
        for _ in range(3):
            assert torch.isfinite(agent.update(batch, llm_features, trajectories)).all()
        weights[name] = torch.cat([p.detach().flatten() for p in agent.policy.parameters()])
    assert torch.equal(weights["fork-off"], weights["script"]) and not torch.equal(weights["fork"], weights["script"])


def test_text_probe_prints_held_out_r2_per_phrasing(tiny_llm, tmp_path):
    """benchmark/text_probe.py offline, on a tiny LLM: one row per phrasing with the held-out R^2 per axis. The control
    (no goal in the prompt: every prompt the same) cannot predict the unseen goals."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "text_probe.py"), "--llm", tiny_llm,
                          "--phrasings", "none", "script", "--embedding-cache-dir", str(tmp_path), "--threads", "1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reach: 40 seen -> 10 unseen goals" in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(("none", "script"))}
    assert set(rows) == {"none", "script"}
    assert all(float(value) <= 0.0 for value in rows["none"][1:4])  # R^2 x, y, z of the control
    assert "'The goal is left, far, middle height: x = -0.02, y = 0.88" in out.stdout  # the script's phrasing, reach@0


def test_ab_update_step_times_two_scripts_in_one_process():
    script = os.path.join(ROOT, "llmdpd_metaworld.py")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "ab_update_step.py"), script, script,
                          "--threads", "1", "--rounds", "2", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [float(re.search(r"median ([\d.]+) ms/step", line).group(1)) > 0 for line in out.stdout.splitlines()] == [True] * 2
