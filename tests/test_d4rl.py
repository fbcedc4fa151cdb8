"""llmdpd_d4rl.py: the data loaders on tiny datasets made here, the score, and end-to-end runs by subprocess."""
import glob
import os

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from conftest import assert_same_training_state, run_script

SCRIPT = "llmdpd_d4rl.py"


def hopper_episodes(n_episodes=4, max_steps=40, seed=0):
    """Random-action Hopper-v5 episodes: (observations T+1, actions, rewards, terminated, truncated) each."""
    env, rng, episodes = gym.make("Hopper-v5", max_episode_steps=max_steps), np.random.default_rng(seed), []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed + episode)
        observations, actions, rewards = [obs], [], []
        while True:
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            if terminated or truncated:
                break
        episodes.append((np.array(observations, np.float32), np.array(actions), np.array(rewards, np.float32),
                         terminated, truncated))
    return episodes


def write_d4rl_file(path, episodes, next_observations=True, **attrs):
    rows = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for observations, actions, rewards, terminated, truncated in episodes:
        T = len(actions)
        rows["observations"].append(observations[:-1])
        rows["next_observations"].append(observations[1:])
        rows["actions"].append(actions)
        rows["rewards"].append(rewards)
        rows["terminals"].append(np.arange(T) == T - 1 if terminated else np.zeros(T, bool))
        rows["timeouts"].append(np.arange(T) == T - 1 if truncated and not terminated else np.zeros(T, bool))
    with h5py.File(path, "w") as file:
        for key, value in rows.items():
            if key != "next_observations" or next_observations:
                file.create_dataset(key, data=np.concatenate(value))
        file.attrs.update(attrs)
    return {key: np.concatenate(value) for key, value in rows.items()}


# A hand-made file: episode 0 ends in a terminal (3 steps), episode 1 in a timeout (2 steps), episode 2 is cut off
# by the end of the file (2 steps).
OBS = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)  # 9 distinct observations, rows of 2


@pytest.fixture
def handmade(tmp_path):
    path = tmp_path / "handmade.hdf5"
    obs = OBS[[0, 1, 2, 4, 5, 7, 8]]
    next_obs = OBS[[1, 2, 3, 5, 6, 8, 0]]
    with h5py.File(path, "w") as file:
        file["observations"], file["next_observations"] = obs, next_obs
        file["actions"] = np.linspace(-1, 1, 7 * 3, dtype=np.float32).reshape(7, 3)
        file["rewards"] = np.arange(7, dtype=np.float32)
        file["terminals"] = np.array([0, 0, 1, 0, 0, 0, 0], bool)
        file["timeouts"] = np.array([0, 0, 0, 0, 1, 0, 0], bool)
    return path


def test_hdf5_loader_keeps_terminals_and_timeouts_apart(d4rl_script, handmade, monkeypatch):
    transitions, _ = d4rl_script.load_hdf5(str(handmade))
    assert len(transitions["rewards"]) == 7
    np.testing.assert_array_equal(transitions["next_obs"][2], OBS[3])
    assert transitions["terminals"].tolist() == [False, False, True, False, False, False, False]
    assert transitions["timeouts"].tolist() == [False, False, False, False, True, False, False]
    assert d4rl_script.episode_bounds(transitions) == [(0, 3), (3, 5), (5, 7)]
    monkeypatch.setattr(d4rl_script, "env_dims", lambda args: (2, 3))  # the hand-made file's sizes
    args = d4rl_script.Args(dataset_path=str(handmade), traj_prompt_len=3)
    trajectories, replay = d4rl_script.load_data(args, None, torch.device("cpu"))
    assert trajectories["Hopper-v5"][:, :2].tolist() == OBS[[7, 7, 8]].tolist()  # the last episode: rows 5 and 6
    # only the terminal stops the bootstrap; the timeout row keeps gamma * Q(s')
    assert replay["not_done"].tolist() == [1, 1, 0, 1, 1, 1, 1]


def test_hdf5_without_next_observations_uses_the_next_row(d4rl_script, handmade, tmp_path):
    path = tmp_path / "old-layout.hdf5"
    with h5py.File(handmade, "r") as source, h5py.File(path, "w") as file:
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            file[key] = source[key][()]
    transitions, _ = d4rl_script.load_hdf5(str(path))
    # the timeout row (4) has no successor in its episode and the last row none at all: both are dropped
    assert transitions["rewards"].tolist() == [0, 1, 2, 3, 5]
    np.testing.assert_array_equal(transitions["next_obs"][:2], OBS[[1, 2]])
    np.testing.assert_array_equal(transitions["next_obs"][3], OBS[5])
    # the row before the dropped timeout row ends episode 1 now, so the episodes stay apart
    assert transitions["timeouts"].tolist() == [False, False, False, True, False]
    assert d4rl_script.episode_bounds(transitions) == [(0, 3), (3, 4), (4, 5)]


def test_hdf5_missing_keys_are_named(d4rl_script, tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as file:
        file["observations"] = np.zeros((3, 2))
    with pytest.raises(SystemExit, match=r"lacks the D4RL keys \['actions', 'rewards', 'terminals'\]"):
        d4rl_script.load_hdf5(str(path))


def test_a_file_that_is_not_hdf5_is_refused(d4rl_script, tmp_path):
    path = tmp_path / "notes.hdf5"
    path.write_text("not HDF5")
    with pytest.raises(SystemExit, match="cannot read .*notes.hdf5 as HDF5"):
        d4rl_script.load_hdf5(str(path))


def test_bad_checkpoints_are_refused_clearly(d4rl_script, tmp_path):
    """The D4RL script's own checks (the Meta-World ones run end to end in test_metaworld.py)."""
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        d4rl_script.load_checkpoint(str(tmp_path / "garbage.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(SystemExit, match="is not an LLMDPD checkpoint"):
        d4rl_script.load_checkpoint(str(tmp_path / "plain.pt"))
    torch.save({"format": "llmdpd-checkpoint-v1", "script": "llmdpd_d4rl.py"}, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="written by another version of this script"):
        d4rl_script.load_checkpoint(str(tmp_path / "old.pt"))
    torch.save({"format": d4rl_script.CHECKPOINT_FORMAT, "script": "llmdpd_metaworld.py"}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="was written by llmdpd_metaworld.py, not by llmdpd_d4rl.py"):
        d4rl_script.load_checkpoint(str(tmp_path / "other.pt"))


def test_minari_loader(d4rl_script, tmp_path, monkeypatch):
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = hopper_episodes(n_episodes=3, max_steps=15)
    buffers = [EpisodeBuffer(id=i, observations=obs, actions=act, rewards=rew,
                             terminations=np.arange(len(act)) == len(act) - 1 if term else np.zeros(len(act), bool),
                             truncations=np.arange(len(act)) == len(act) - 1 if trunc and not term else np.zeros(len(act), bool))
               for i, (obs, act, rew, term, trunc) in enumerate(episodes)]
    minari.create_dataset_from_buffers("test/hopper/random-v0", buffers, env="Hopper-v5", ref_min_score=-20.0,
                                       ref_max_score=3000.0)
    transitions, metadata = d4rl_script.load_minari("test/hopper/random-v0")
    assert len(transitions["rewards"]) == sum(len(e[1]) for e in episodes)
    first = episodes[0]
    np.testing.assert_allclose(transitions["obs"][: len(first[1])], first[0][:-1])
    np.testing.assert_allclose(transitions["next_obs"][: len(first[1])], first[0][1:])
    assert transitions["terminals"].sum() == sum(e[3] for e in episodes)
    assert transitions["timeouts"].sum() == sum(e[4] and not e[3] for e in episodes)
    assert len(d4rl_script.episode_bounds(transitions)) == 3
    args = d4rl_script.Args()
    assert d4rl_script.reference_scores(args, metadata) == (-20.0, 3000.0, "the dataset's metadata")


def test_missing_minari_dataset_offline(d4rl_script, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        d4rl_script.load_minari("mujoco/hopper/medium-v0")


def test_normalized_score_by_hand(d4rl_script):
    # Hopper's D4RL references: random -20.272305, expert 3234.3
    assert d4rl_script.normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    assert d4rl_script.normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)
    assert d4rl_script.normalized_score(1607.0, -20.272305, 3234.3) == pytest.approx(100 * 1627.272305 / 3254.572305)
    args = d4rl_script.Args(env_id="Walker2d-v5")
    assert d4rl_script.reference_scores(args, {}) == (1.629008, 4592.3, "D4RL's reference returns")
    args = d4rl_script.Args(env_id="Walker2d-v5", ref_min_score=0.0, ref_max_score=10.0)
    assert d4rl_script.reference_scores(args, {"ref_min_score": 1, "ref_max_score": 2})[:2] == (0.0, 10.0)


def tiny_flags(tiny_llm, cache, *extra):
    return ["--env-id", "Hopper-v5", "--llm", tiny_llm, "--embedding-cache-dir", cache, "--total-steps", "30",
            "--batch-size", "32", "--hidden-dim", "64", "--traj-prompt-len", "8", "--eval-episodes", "2",
            "--eval-candidates", "4", "--eval-every", "0", "--log-every", "10", "--ema-start", "10", *extra]


def assert_finished(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("SPS=") and float(lines[-1][4:]) > 0
    assert any(line.startswith("Hopper-v5") for line in lines)
    return lines


def test_end_to_end_on_a_d4rl_file(tiny_llm, tmp_path):
    episodes = hopper_episodes(n_episodes=6, max_steps=30)
    write_d4rl_file(tmp_path / "hopper-tiny.hdf5", episodes, ref_min_score=-20.272305, ref_max_score=3234.3)
    result = run_script(SCRIPT, *tiny_flags(tiny_llm, str(tmp_path / "cache"), "--dataset-path",
                                            str(tmp_path / "hopper-tiny.hdf5"), "--save-model"), cwd=tmp_path)
    lines = assert_finished(result)
    assert any(f"offline data: {sum(len(e[1]) for e in episodes)} transitions, 6 episodes" in line for line in lines)
    assert "normalised score from the dataset's metadata" in result.stdout
    checkpoint = glob.glob(str(tmp_path / "runs" / "Hopper-v5__*" / "checkpoint.pt"))
    assert len(checkpoint) == 1
    saved_dtype = torch.load(checkpoint[0], weights_only=False)["args"]["llm_dtype"]
    assert saved_dtype == ("bfloat16" if torch.cuda.is_available() else "float32")  # what `auto` was, not `auto`
    assert f"text prompts: 1 embedded with {tiny_llm} ({saved_dtype}), 1 LLM forward passes" in result.stdout
    # the training command again, plus --eval-only: flags that agree with the checkpoint are accepted (`auto` included)
    result = run_script(SCRIPT, *tiny_flags(tiny_llm, str(tmp_path / "cache"), "--dataset-path", str(tmp_path / "hopper-tiny.hdf5"),
                                            "--save-model", "--eval-only", "--checkpoint", checkpoint[0], "--llm-dtype", "auto"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Hopper-v5" in result.stdout and "normalized_score" in result.stdout
    # a flag that disagrees would be ignored (the model was trained on Hopper): refused, saying what the checkpoint has
    result = run_script(SCRIPT, "--eval-only", "--checkpoint", checkpoint[0], "--env-id", "Walker2d-v5", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--env-id 'Walker2d-v5' (the checkpoint has 'Hopper-v5')" in result.stderr
    # the dataset file may move: --resume reads it where it is now
    os.makedirs(tmp_path / "moved")
    os.replace(tmp_path / "hopper-tiny.hdf5", tmp_path / "moved" / "hopper-tiny.hdf5")
    flags = tiny_flags(tiny_llm, str(tmp_path / "cache"), "--dataset-path", str(tmp_path / "moved" / "hopper-tiny.hdf5"),
                       "--save-model", "--resume", checkpoint[0])  # the run's own command line, with the new path
    flags[flags.index("--total-steps") + 1] = "40"
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert_finished(result)
    assert "text prompts: 0 embedded" in result.stdout and "1 from the checkpoint" in result.stdout  # no LLM, no cache
    if not torch.cuda.is_available():  # (CUDA's index_select backward adds in no fixed order: not bit for bit there)
        # the resumed run is the run that never stopped: one 40-step run, evaluating at step 30 as the first run ended
        flags = tiny_flags(tiny_llm, str(tmp_path / "cache"), "--dataset-path", str(tmp_path / "moved" / "hopper-tiny.hdf5"),
                           "--save-model", "--eval-every", "30")
        flags[flags.index("--total-steps") + 1] = "40"
        os.makedirs(tmp_path / "straight")
        assert_finished(run_script(SCRIPT, *flags, cwd=tmp_path / "straight"))
        straight_checkpoint = glob.glob(str(tmp_path / "straight" / "runs" / "*" / "checkpoint.pt"))[0]
        assert_same_training_state(straight_checkpoint, checkpoint[0], 40)
    # but another dataset is not the run's: its trajectory prompt differs from the checkpoint's
    write_d4rl_file(tmp_path / "other.hdf5", hopper_episodes(n_episodes=6, max_steps=30, seed=1))
    before = open(checkpoint[0], "rb").read()
    result = run_script(SCRIPT, "--resume", checkpoint[0], "--total-steps", "50", "--dataset-path",
                        str(tmp_path / "other.hdf5"), cwd=tmp_path)
    assert result.returncode != 0 and "is not the data it was trained on" in result.stderr
    assert open(checkpoint[0], "rb").read() == before


def test_end_to_end_on_a_minari_dataset(tiny_llm, tmp_path):
    from minari.data_collector import EpisodeBuffer
    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path / "minari")
    try:
        buffers = [EpisodeBuffer(id=i, observations=obs, actions=act, rewards=rew,
                                 terminations=np.arange(len(act)) == len(act) - 1 if term else np.zeros(len(act), bool),
                                 truncations=np.arange(len(act)) == len(act) - 1 if trunc and not term else np.zeros(len(act), bool))
                   for i, (obs, act, rew, term, trunc) in enumerate(hopper_episodes(n_episodes=4, max_steps=25))]
        minari.create_dataset_from_buffers("test/hopper/tiny-v0", buffers, env="Hopper-v5", ref_min_score=-20.272305,
                                           ref_max_score=3234.3)
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    flags = tiny_flags(tiny_llm, str(tmp_path / "cache"), "--minari-id", "test/hopper/tiny-v0",
                       "--dataset-dir", str(tmp_path / "minari"))
    flags[flags.index("--eval-every") + 1] = "20"  # an evaluation between two training steps (on CUDA: graph replays)
    result = run_script(SCRIPT, *flags, cwd=tmp_path)
    assert_finished(result)
    assert "normalised score from the dataset's metadata" in result.stdout
    assert "eval step      20" in result.stdout


@pytest.mark.parametrize("data_flags, cause", [
    ([], "neither --dataset-path nor --minari-id was given"),
    (["--minari-id", "mujoco/hopper/medium-v0"], "'mujoco/hopper/medium-v0' is not local and HF_HUB_OFFLINE=1 forbids"),
    (["--dataset-path", "no-such-file.hdf5"], "no-such-file.hdf5 does not exist")])
def test_missing_data_names_the_cause_and_the_three_ways(data_flags, cause, tmp_path):
    result = run_script(SCRIPT, "--env-id", "Hopper-v5", "--dataset-dir", str(tmp_path / "empty"), *data_flags, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert cause in result.stderr
    assert "Three ways to get it" in result.stderr
    for way in ("1. a classic D4RL file", "2. a Minari dataset", "3. any HDF5 file in D4RL's layout"):
        assert way in result.stderr


def test_one_reference_score_alone_is_refused(tmp_path):
    result = run_script(SCRIPT, "--ref-min-score", "0", cwd=tmp_path)
    assert result.returncode != 0 and "give both --ref-min-score and --ref-max-score" in result.stderr


@pytest.mark.parametrize("env_id", ["Ant-v5", "Hopper-v3", "Hopper-v9"])
def test_unknown_env_id(tmp_path, env_id):
    result = run_script(SCRIPT, "--env-id", env_id, cwd=tmp_path)
    assert result.returncode != 0 and f"unknown --env-id {env_id!r}" in result.stderr and "Traceback" not in result.stderr


def test_trajectory_prompt_episode_out_of_range_is_refused(tmp_path):
    write_d4rl_file(tmp_path / "hopper-tiny.hdf5", hopper_episodes(n_episodes=3, max_steps=20))
    result = run_script(SCRIPT, "--dataset-path", str(tmp_path / "hopper-tiny.hdf5"), "--no-text-prompt",
                        "--traj-prompt-episode", "3", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--traj-prompt-episode 3 is out of range: the data has 3 episodes" in result.stderr
