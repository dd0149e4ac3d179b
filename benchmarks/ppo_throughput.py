"""PPO cost on the default model: rollouts with and without the policy's KV cache, and the update phase
of stock SB3 ``PPO.train()`` (one forward per stored observation) vs ``LMPPO.train()`` (one per episode).

Both updates see the same rollout tokens, the same epochs and the same tokens per minibatch. The update's
fraction of the FLOP bound uses 6 x parameters x tokens/s against a matmul measured in the same run.
Run from the project root: ``python -m benchmarks.ppo_throughput [--envs 2] [--response-tokens 64]``.
"""

from __future__ import annotations

import argparse
import time

from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

from agents import LMPPO, TransformerActorCriticPolicy
from benchmarks.machine import describe_machine, matmul_gflops
from lm_gym.sb3 import SB3VecEnv


def zero_reward(prompts, responses, **context):
    return [0.0] * len(responses)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def rollout_seconds(agent, cached: bool) -> tuple[float, float]:
    """(seconds of one SB3 ``collect_rollouts``, seconds of it inside the policy), cache on or off."""
    policy = agent.policy
    act = policy._act if cached else (lambda obs, values=True: policy._evaluate_latest(obs))  # off: full forward
    spent = [0.0]

    def timed_act(obs, values=True):
        started = time.perf_counter()
        result = act(obs, values)
        spent[0] += time.perf_counter() - started
        return result

    policy._act = timed_act
    _, callback = agent._setup_learn(agent.n_steps * agent.n_envs, None)  # resets the env
    seconds = timed(lambda: agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps))
    del policy._act
    return seconds, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=2, help="env rows of the update comparison")
    parser.add_argument("--rollout-envs", type=int, default=8, help="env rows of the rollout comparison")
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--minibatch-tokens", type=int, default=64)
    args = parser.parse_args()
    def make_env(rows):
        return SB3VecEnv(rows, max_new_tokens=args.response_tokens, max_prompt_tokens=64, truncate_prompt="left",
                         reward=zero_reward, device="cpu")

    common = dict(n_steps=args.response_tokens, batch_size=args.minibatch_tokens, n_epochs=1, seed=0, device="cpu",
                  policy_kwargs={"model": "default", "device": "cpu"})
    roller = PPO(TransformerActorCriticPolicy, make_env(args.rollout_envs), gamma=1.0, **common)
    roller.set_logger(configure(None, []))
    with_cache = rollout_seconds(roller, cached=True)
    without_cache = rollout_seconds(roller, cached=False)
    rollout_tokens = args.rollout_envs * args.response_tokens
    del roller

    env = make_env(args.envs)
    tokens = args.envs * args.response_tokens
    stock = PPO(TransformerActorCriticPolicy, env, gamma=1.0, clip_range_vf=0.2, **common)
    stock.set_logger(configure(None, []))
    rollout_seconds(stock, cached=True)
    stock_update = timed(stock.train)

    ours = LMPPO(env=env, **common)
    ours.set_logger(configure(None, []))
    _, callback = ours._setup_learn(ours.n_steps * ours.n_envs, None)
    ours.collect_rollouts(env, callback, None, ours.n_steps)
    ours_update = timed(ours.train)

    params = sum(p.numel() for p in ours.policy.parameters() if p.requires_grad)
    gflops = matmul_gflops()
    print(f"machine: {describe_machine()}")
    print(f"default model, {args.response_tokens} response tokens; rollouts over {args.rollout_envs} envs "
          f"({rollout_tokens} tokens); updates over {args.envs} envs ({tokens} tokens), 1 epoch, "
          f"{args.minibatch_tokens} tokens per minibatch; matmul {gflops:.0f} GFLOP/s\n")
    print("| phase | variant | seconds | tokens/s | ratio | fraction of FLOP bound |\n|---|---|---|---|---|---|")
    for label, (seconds, policy_seconds) in (("full forward per step", without_cache),
                                             ("our incremental cache", with_cache)):
        print(f"| rollout (policy + env) | stock SB3, {label} | {seconds:.1f} | {rollout_tokens / seconds:.1f} | "
              f"{without_cache[0] / seconds:.1f}x | |")
        print(f"| rollout (policy only) | stock SB3, {label} | {policy_seconds:.1f} | "
              f"{rollout_tokens / policy_seconds:.1f} | {without_cache[1] / policy_seconds:.1f}x | |")
    for label, seconds in (("stock PPO.train()", stock_update), ("LMPPO.train()", ours_update)):
        rate = tokens / seconds
        print(f"| update | {label} | {seconds:.1f} | {rate:.1f} | {stock_update / seconds:.1f}x | "
              f"{6 * params * rate / (gflops * 1e9):.0%} |")


if __name__ == "__main__":
    main()
