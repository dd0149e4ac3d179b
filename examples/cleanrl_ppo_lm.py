"""PPO on LanguageModelEnv in one readable file, CleanRL style: the network is the Transformer itself.

The LM head gives the action logits (one token per step), a linear value head on the last hidden state
gives V(s). Rollouts come from ``gymnasium.make_vec("LanguageModelEnv-v0", num_envs=...)`` (all rows in
one batched forward of the env's LM); the update is the textbook clipped PPO loss over every stored
observation, one full forward each, as CleanRL does it. ``agents.LMPPO`` is the fast version of the same
idea (one forward per episode, the LM recipe); this file is for reading and hacking.

With ``--max-turns 2`` or more the episodes are dialogues: between the agent's turns the env's LM answers,
and its ids enter the observations as context (``agent_mask`` 0). Every stored step is one of the agent's
own tokens, so the loss, the advantages and their normalisation cover the agent's ids alone.

    python examples/cleanrl_ppo_lm.py --model tiny --num-updates 20 [--max-turns 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import lm_gym
from lm_gym.padding import mask_positions


@dataclass
class Args:
    model: str = "tiny"  # "default" for SmolLM2-135M-Instruct
    num_envs: int = 8
    max_new_tokens: int = 8  # per agent turn
    max_turns: int = 1  # agent turns per episode; more: the env's LM answers between them
    num_steps: int = 16  # env steps per rollout, per env
    num_updates: int = 20
    learning_rate: float = 3e-3
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    seed: int = 0


def low_token_ids(prompts, responses, response_ids, **context):
    """The demo reward: the fraction of response tokens with an id below 200 (chance is about 0.2 on tiny)."""
    return [float(np.mean([token < 200 for token in ids])) for ids in response_ids]


class Agent(nn.Module):
    """Actor = the LM head, critic = a zero-initialised linear head on the last hidden state."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm.requires_grad_(True)
        self.value = nn.Linear(lm.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token logits (B, V), values (B,)) for left-padded observations."""
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), logits_to_keep=1,
                      output_hidden_states=True, use_cache=False)
        return out.logits[:, -1].float(), self.value(out.hidden_states[-1][:, -1].float()).squeeze(-1)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the mean finished-episode reward of each update."""
    args = parse(argv)
    torch.manual_seed(args.seed)
    dialogue = None if args.max_turns == 1 else {  # room for the prompt and every turn, the LM's replies cut at 16
        "max_turns": args.max_turns, "context_tokens": 128 + args.max_turns * (args.max_new_tokens + 24),
        "max_reply_tokens": 16}
    envs = gym.make_vec("LanguageModelEnv-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                        model=args.model, max_new_tokens=args.max_new_tokens, reward=low_token_ids,
                        multi_turn=dialogue, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = Agent(lm_gym.load_model(args.model)[0])
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    length = envs.single_observation_space["input_ids"].shape[0]
    ids = torch.zeros((args.num_steps, args.num_envs, length), dtype=torch.long)
    masks, actions = torch.zeros_like(ids), torch.zeros((args.num_steps, args.num_envs), dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros((args.num_steps, args.num_envs)) for _ in range(4))
    obs, _ = envs.reset(seed=args.seed)
    history, started = [], time.perf_counter()
    for update in range(args.num_updates):
        finished = []
        for step in range(args.num_steps):  # rollout
            ids[step], masks[step] = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
            with torch.no_grad():
                logits, values[step] = agent(ids[step], masks[step])
            distribution = torch.distributions.Categorical(logits=logits)
            actions[step] = distribution.sample()
            logprobs[step] = distribution.log_prob(actions[step])
            obs, reward, terminated, truncated, _ = envs.step(actions[step].numpy())
            rewards[step], dones[step] = torch.as_tensor(reward), torch.as_tensor(terminated | truncated).float()
            finished += reward[terminated | truncated].tolist()
        with torch.no_grad():  # V of the state the rollout stopped in: unfinished episodes bootstrap from it
            next_value = agent(torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"]))[1]
        advantages = gae(rewards, values, dones, next_value, args)
        returns = advantages + values
        stats = ppo_update(agent, optimizer, (ids, masks, actions, logprobs, advantages, returns, values), args)
        history.append(float(np.mean(finished)) if finished else float("nan"))
        print(f"update {update + 1}/{args.num_updates}: episode reward {history[-1]:.3f}, approx_kl "
              f"{stats['approx_kl']:.4f}, value loss {stats['value_loss']:.4f}, {time.perf_counter() - started:.0f} s")
    envs.close()
    return history


def gae(rewards, values, dones, next_value, args) -> torch.Tensor:
    """GAE(γ, λ) over the rollout; an episode's last step (done) does not bootstrap (SAME_STEP autoreset)."""
    advantages, running = torch.zeros_like(rewards), torch.zeros(rewards.shape[1])
    for t in reversed(range(len(rewards))):
        following = (values[t + 1] if t + 1 < len(rewards) else next_value) * (1 - dones[t])
        delta = rewards[t] + args.gamma * following - values[t]
        running = delta + args.gamma * args.gae_lambda * (1 - dones[t]) * running
        advantages[t] = running
    return advantages


def ppo_update(agent, optimizer, batch, args) -> dict:
    """Clipped PPO epochs over every stored observation (one full forward each), shuffled minibatches."""
    ids, masks, actions, old_logprobs, advantages, returns, old_values = (t.flatten(0, 1) for t in batch)
    size = len(ids) // args.num_minibatches
    for _ in range(args.update_epochs):
        for rows in torch.randperm(len(ids)).split(size):
            logits, value = agent(ids[rows], masks[rows])
            distribution = torch.distributions.Categorical(logits=logits)
            log_ratio = distribution.log_prob(actions[rows]) - old_logprobs[rows]
            ratio = log_ratio.exp()
            advantage = (advantages[rows] - advantages[rows].mean()) / (advantages[rows].std() + 1e-8)
            policy_loss = torch.max(-advantage * ratio,
                                    -advantage * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            clipped = old_values[rows] + (value - old_values[rows]).clamp(-args.clip_coef, args.clip_coef)
            value_loss = 0.5 * torch.max((value - returns[rows]) ** 2, (clipped - returns[rows]) ** 2).mean()
            optimizer.zero_grad()
            (policy_loss + args.vf_coef * value_loss).backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
    return {"approx_kl": ((ratio - 1) - log_ratio).mean().item(), "value_loss": value_loss.item()}


def parse(argv: list[str] | None) -> Args:
    """``Args`` from the command line: one flag per field."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return Args(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
