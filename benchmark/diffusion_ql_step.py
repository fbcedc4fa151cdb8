"""A plain Diffusion-QL training step, timed on random data: the reference that update_step.py compares LLMDPD with.

Written from the published settings of Wang et al. 2023, "Diffusion Policies as an Expressive Policy Class for
Offline RL" (ICLR), and the hyper-parameters of the official repository (Zhendong-Wang/Diffusion-Policies-for-
Offline-RL): VP schedule (beta 0.1 to 10, T=5), a 3x256 Mish noise MLP over [x, time embedding, s], x0 clipped to
+-max_action, twin 3x256 Mish critics, actor loss bc + eta * normalised Q of one twin drawn at random, critic target
from the EMA actor (0.995 every 5 steps from step 1000) and the twin target critics' min, Adam lr 3e-4, batch 256,
gamma 0.99, tau 0.005, grad-norm clipping 4.0. Plain on purpose: torch's nn.Mish and Adam, no speed tricks.

    python benchmark/diffusion_ql_step.py --steps 200 --threads 1
"""
import argparse
import copy
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

T, MAX_ACTION, GAMMA, TAU, ETA, GRAD_NORM = 5, 1.0, 0.99, 0.005, 1.0, 4.0
EMA_DECAY, EMA_EVERY, EMA_START = 0.995, 5, 1000


def mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 256), nn.Mish(), nn.Linear(256, 256), nn.Mish(),
                         nn.Linear(256, 256), nn.Mish(), nn.Linear(256, outputs))


class Diffusion(nn.Module):
    """The actor: a T-step VP diffusion over actions whose noise model sees the state."""

    def __init__(self, obs: int, act: int):
        super().__init__()
        self.act = act
        self.time_mlp = nn.Sequential(nn.Linear(16, 32), nn.Mish(), nn.Linear(32, 16))
        self.noise_model = mlp(act + 16 + obs, act)
        t = torch.arange(1, T + 1, dtype=torch.float32)
        betas = 1 - torch.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * t - 1) / T**2)
        alphas_bar = torch.cumprod(1 - betas, 0)
        alphas_bar_prev = torch.cat([torch.ones(1), alphas_bar[:-1]])
        variance = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
        for name, value in dict(sqrt_ab=alphas_bar.sqrt(), sqrt_1m_ab=(1 - alphas_bar).sqrt(),
                                recip_ab=(1 / alphas_bar).sqrt(), recipm1_ab=(1 / alphas_bar - 1).sqrt(),
                                coef_x0=betas * alphas_bar_prev.sqrt() / (1 - alphas_bar),
                                coef_xt=(1 - alphas_bar_prev) * (1 - betas).sqrt() / (1 - alphas_bar),
                                log_var=variance.clamp(min=1e-20).log()).items():
            self.register_buffer(name, value)

    def eps(self, x, t, s):
        freqs = torch.exp(torch.arange(8, device=x.device) * -(math.log(10000) / 7))
        angles = t.float()[:, None] * freqs[None]
        t_emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], -1))
        return self.noise_model(torch.cat([x, t_emb, s], -1))

    def loss(self, a, s):  # behaviour cloning: predict the noise added at a random step
        t = torch.randint(0, T, (a.shape[0],), device=a.device)
        noise = torch.randn_like(a)
        x_t = self.sqrt_ab[t, None] * a + self.sqrt_1m_ab[t, None] * noise
        return F.mse_loss(self.eps(x_t, t, s), noise)

    def forward(self, s):  # the full reverse chain, differentiable
        x = torch.randn(s.shape[0], self.act, device=s.device)
        for i in reversed(range(T)):
            t = torch.full((s.shape[0],), i, device=s.device, dtype=torch.long)
            x0 = (self.recip_ab[i] * x - self.recipm1_ab[i] * self.eps(x, t, s)).clamp(-MAX_ACTION, MAX_ACTION)
            mean = self.coef_x0[i] * x0 + self.coef_xt[i] * x
            x = mean + (torch.exp(0.5 * self.log_var[i]) * torch.randn_like(x) if i > 0 else 0)
        return x.clamp(-MAX_ACTION, MAX_ACTION)


def twin_q(critic: nn.ModuleList, s, a):
    sa = torch.cat([s, a], -1)
    return critic[0](sa), critic[1](sa)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--obs", type=int, default=39)
    parser.add_argument("--act", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    random.seed(0)
    n, obs_dim, act_dim = 100_000, options.obs, options.act
    replay = dict(s=torch.randn(n, obs_dim), a=torch.rand(n, act_dim) * 2 - 1, r=torch.randn(n, 1),
                  s2=torch.randn(n, obs_dim), not_done=torch.ones(n, 1))
    actor, critic = Diffusion(obs_dim, act_dim), nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2)])
    ema_actor, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_opt, critic_opt = torch.optim.Adam(actor.parameters(), 3e-4), torch.optim.Adam(critic.parameters(), 3e-4)

    def train_step(step):
        idx = torch.randint(n, (options.batch_size,))
        s, a, r, s2, not_done = (replay[key][idx] for key in ("s", "a", "r", "s2", "not_done"))
        # critic: twin Q towards r + gamma * min of the target critics at the EMA actor's next action
        q1, q2 = twin_q(critic, s, a)
        with torch.no_grad():
            target = r + not_done * GAMMA * torch.min(*twin_q(critic_target, s2, ema_actor(s2)))
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(critic.parameters(), GRAD_NORM)
        critic_opt.step()
        # actor: behaviour cloning + eta * normalised Q of a freshly sampled action, one twin drawn at random
        bc_loss = actor.loss(a, s)
        q1_new, q2_new = twin_q(critic, s, actor(s))
        q_i, q_j = (q1_new, q2_new) if random.random() > 0.5 else (q2_new, q1_new)
        actor_loss = bc_loss + ETA * (-q_i.mean() / q_j.abs().mean().detach())
        actor_opt.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(actor.parameters(), GRAD_NORM)
        actor_opt.step()
        with torch.no_grad():
            if step % EMA_EVERY == 0 and step >= EMA_START:  # before EMA_START the EMA actor stays as initialised
                for p_ema, p in zip(ema_actor.parameters(), actor.parameters()):
                    p_ema.lerp_(p, 1 - EMA_DECAY)
            for p_target, p in zip(critic_target.parameters(), critic.parameters()):
                p_target.lerp_(p, TAU)

    for step in range(20):  # warm-up, not timed
        train_step(step)
    start = time.perf_counter()
    for step in range(20, 20 + options.steps):
        train_step(step)
    sps = options.steps / (time.perf_counter() - start)
    print(f"diffusion_ql_sps {sps:.1f}")


if __name__ == "__main__":
    main()
