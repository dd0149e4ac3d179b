"""The ``lm-gym`` command."""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym
import torch

import lm_gym


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lm-gym`` console script."""
    parser = argparse.ArgumentParser(prog="lm-gym", description="Reinforcement learning on language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    rollout = commands.add_parser("rollout", help="play a few episodes of LanguageModelEnv-v0 and print them")
    rollout.add_argument("--model", default="default", help="'default', 'tiny', a directory or a hub id")
    rollout.add_argument("--episodes", type=int, default=3)
    rollout.add_argument("--max-new-tokens", type=int, default=48)
    rollout.add_argument(
        "--policy", choices=["reference", "random"], default="reference",
        help="'reference' samples from the env's own LM, 'random' picks uniform token ids",
    )
    rollout.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --policy reference")
    rollout.add_argument("--seed", type=int, default=0)
    rollout.add_argument("--device", default=None, help="e.g. 'cpu' or 'cuda'; default CUDA when available")
    args = parser.parse_args(argv)
    try:
        return run_rollout(args)
    except (lm_gym.ModelNotFoundError, ValueError) as err:
        print(f"lm-gym: error: {err}", file=sys.stderr)
        return 2


def run_rollout(args: argparse.Namespace) -> int:
    """Play ``args.episodes`` episodes and print prompt, response, reward and speed for each."""
    if args.episodes < 1 or args.temperature <= 0:
        raise ValueError("--episodes must be >= 1 and --temperature > 0")
    env = gym.make(lm_gym.ENV_ID, model=args.model, max_new_tokens=args.max_new_tokens, device=args.device)
    base = env.unwrapped
    generator = torch.Generator(device=base.core.device).manual_seed(args.seed)
    env.action_space.seed(args.seed)
    total_tokens, started = 0, time.perf_counter()
    for episode in range(args.episodes):
        obs, info = env.reset(seed=args.seed + episode)
        done = False
        while not done:
            if args.policy == "random":
                action = int(env.action_space.sample())
            else:
                probs = torch.softmax(base.next_token_logprobs() / args.temperature, dim=-1)
                action = int(torch.multinomial(probs, 1, generator=generator))
            obs, reward, terminated, truncated, info = env.step(action)
            total_tokens += 1
            done = terminated or truncated
        _print_episode(episode, reward, terminated, info)
    elapsed = time.perf_counter() - started
    print(f"{args.episodes} episodes, {total_tokens} tokens in {elapsed:.1f} s ({total_tokens / elapsed:.1f} tokens/s)")
    env.close()
    return 0


def _print_episode(episode: int, reward: float, terminated: bool, info: dict) -> None:
    ending = "stop token" if terminated else "length limit"
    components = ", ".join(f"{name}={value:.3f}" for name, value in info["reward_components"].items())
    print(f"--- episode {episode}: reward {reward:.3f} ({components}); ended by {ending}")
    print(f"prompt:   {info['prompt_text']}")
    print(f"response: {info['response_text'].strip()}\n")


if __name__ == "__main__":
    raise SystemExit(main())
