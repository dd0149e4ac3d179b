"""Run by tests/test_distributed.py, under torchrun or alone: three LMPPO updates on the tiny model, the
first a critic warm-up (the actor frozen), so DDP is rewrapped once the actor joins.

Writes ``OUT/rank{r}.pt`` with the flat parameters (all, and the LM's) before and after, and the env steps
counted after each update, so the test can compare ranks with each other and with a single process.
"""

import sys
from pathlib import Path

import torch

from agents import distributed
from agents.train import TrainConfig, training_data, make_agent, make_rank_env, train_iteration


def flat_parameters(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def main(out: Path, num_envs: int) -> None:
    distributed.setup()
    config = TrainConfig(model="tiny", num_envs=num_envs, iterations=3, max_new_tokens=4, max_prompt_tokens=48,
                         eval_prompts=4, learning_rate=1e-3, batch_size=16, critic_warmup=1)
    env = make_rank_env(config, training_data(config))
    agent = make_agent(config, env)
    start, lm_start, timesteps = flat_parameters(agent.policy), flat_parameters(agent.actor_critic.lm), []
    for iteration in range(config.iterations):
        train_iteration(agent, env, config, iteration)
        timesteps.append(agent.num_timesteps)
    lm_changed = not torch.equal(lm_start, flat_parameters(agent.actor_critic.lm))
    record = {"start": start, "end": flat_parameters(agent.policy), "lm_changed": lm_changed, "timesteps": timesteps,
              "reward_count": agent.reward_stats.count}
    torch.save(record, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
