"""Run by tests/test_distributed.py under torchrun: GRPO with two ranks of one group each, where rank 0's
reward is uniform (its only group carries no signal) and rank 1's never is.

Writes ``OUT/rank{r}.pt`` with the flat parameters before and after, the updates taken, and a csv
log (``OUT/log{r}/progress.csv``), so the test can check that the ranks skipped together instead of waiting
on each other.
"""

import itertools
import sys
from pathlib import Path

import torch
from stable_baselines3.common.logger import configure

from agents import distributed
from agents.train import TrainConfig, TrainingData, make_agent, make_rank_env, train_iteration
from ddp_worker import flat_parameters  # torchrun puts this script's folder on sys.path


def rank_reward():
    """Rank 0: 0 for every response; rank 1: a new number for each, so its groups always differ."""
    counter = itertools.count()
    if distributed.rank() == 0:
        return lambda prompts, responses: [0.0] * len(responses)
    return lambda prompts, responses: [float(next(counter)) for _ in responses]


def main(out: Path) -> None:
    distributed.setup()
    config = TrainConfig(model="tiny", algo="grpo", group_size=2, num_envs=4, iterations=2, max_new_tokens=4,
                         max_prompt_tokens=48, learning_rate=1e-3, missing_eos_penalty=0.0)
    prompts = ["Say something.", "Name a colour.", "Count to three."]
    env = make_rank_env(config, TrainingData(prompts, prompts, rank_reward))
    agent = make_agent(config, env)
    agent.set_logger(configure(str(out / f"log{distributed.rank()}"), ["csv"]))
    start = flat_parameters(agent.policy)
    for iteration in range(config.iterations):
        train_iteration(agent, env, config, iteration)
    record = {"start": start, "end": flat_parameters(agent.policy), "updates": agent._n_updates,
              "trained_rollouts": agent.trained_rollouts}
    torch.save(record, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
