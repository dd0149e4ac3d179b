"""LMPPO in bf16 against float32: the update's speed on one rollout, and how far rollout log-probs (incremental
decode) and training log-probs (one forward per episode) of the same tokens drift apart in each precision.

One rollout of the default model is collected per precision. Speed: ``LMPPO.train()`` on the same rollout
(the bf16 one) in both precisions, full fine-tuning and LoRA, with the fraction of each precision's FLOP bound
(6 x parameters x trained tokens/s, 4 x for LoRA, against a 2048^3 matmul in that dtype, measured in the same
run). Mismatch: before any update, the
training forward's log-probs of each rollout's tokens against the log-probs the rollout sampled them with:
mean and max |delta log p|, the spread of the PPO ratio on the first minibatch, and approx_kl there.
Run from the project root: ``python -m benchmarks.precision_ppo [--envs 16] [--response-tokens 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from stable_baselines3.common.logger import configure

from agents import LMPPO
from benchmarks.machine import describe_machine, matmul_gflops
from lm_gym.sb3 import SB3VecEnv


def zero_reward(prompts, responses, **context):
    return [0.0] * len(responses)


LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def make_agent(precision: str, env: SB3VecEnv, args, lora=None) -> LMPPO:
    agent = LMPPO(env=env, n_steps=args.response_tokens, batch_size=args.minibatch_tokens, n_epochs=args.epochs,
                  seed=0, device="cpu", precision=precision,
                  policy_kwargs={"model": "default", "device": "cpu", "lora": lora})
    agent.set_logger(configure(None, []))
    return agent


def collect(agent: LMPPO) -> None:
    _, callback = agent._setup_learn(agent.n_steps * agent.n_envs, None)  # resets the env
    agent.collect_rollouts(agent.env, callback, None, agent.n_steps)


@torch.no_grad()
def mismatch(agent: LMPPO) -> dict[str, float]:
    """Training-forward log-probs of the rollout's tokens against the rollout's own, before any update."""
    data = agent.rollout.batch(agent.actor_critic.tokenizer.pad_token_id, agent.device)
    valid = data.mask.bool()
    steps = data.mask.shape[1]
    columns = torch.arange(steps)[None, :] + (steps - data.mask.sum(dim=1).long())[:, None]
    evaluation = agent.actor_critic(data.ids, data.attention_mask, data.tokens, columns.clamp(max=steps), valid,
                                    agent.rollout.allowed)
    delta = (evaluation.logprobs - data.logprobs)[valid]
    first = torch.zeros_like(valid)
    first[agent._minibatches(data.mask)[0]] = True
    log_ratio = (evaluation.logprobs - data.logprobs)[valid & first]
    ratio = log_ratio.exp()
    return {
        "mean |dlogp|": float(delta.abs().mean()), "max |dlogp|": float(delta.abs().max()),
        "ratio std (1st minibatch)": float(ratio.std()),
        "ratio min..max": f"{float(ratio.min()):.3f}..{float(ratio.max()):.3f}",
        "approx_kl (1st minibatch)": float(((ratio - 1) - log_ratio).mean()),
        "clip fraction": float(((ratio - 1).abs() > 0.2).float().mean()),
    }


def first_minibatch_after_recompute(agent: LMPPO) -> dict[str, float]:
    """PPO's ratio on the first minibatch as LMPPO sees it by default in bf16 (old log-probs recomputed)."""
    data = agent.rollout.batch(agent.actor_critic.tokenizer.pad_token_id, agent.device)
    minibatches = agent._minibatches(data.mask)
    agent._fill_advantages(data, minibatches)
    with torch.no_grad():
        _, stats = agent.segment_loss(data, minibatches[0], 0.2)
    return stats


def timed_train(agent: LMPPO, repeats: int) -> float:
    """The fastest of ``repeats`` ``train()`` calls from the same state (after one warm-up call)."""
    state, times = agent.training_state(), []
    for _ in range(repeats + 1):
        agent.load_training_state(state)
        started = time.perf_counter()
        agent.train()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--minibatch-tokens", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed train() calls per row (the fastest counts)")
    args = parser.parse_args()
    env = SB3VecEnv(args.envs, max_new_tokens=args.response_tokens, max_prompt_tokens=64, truncate_prompt="left",
                    reward=zero_reward, device="cpu", precision="bf16", reference_logprobs=False)
    mismatches, rollout = {}, None
    for precision in ("fp32", "bf16"):
        agent = make_agent(precision, env, args)
        collect(agent)
        mismatches[precision] = mismatch(agent)
        rollout = agent.rollout  # the bf16 one: both precisions train on it
    recomputed = first_minibatch_after_recompute(agent)
    tokens = sum(len(s.tokens) for s in rollout.segments)
    positions = sum(len(s.context) + len(s.tokens) for s in rollout.segments)
    rows = []
    for label, lora, flops_per_token in (("full fine-tuning", None, 6), ("LoRA r=16, all linear layers", LORA, 4)):
        for precision in ("fp32", "bf16"):
            agent = make_agent(precision, env, args, lora)
            agent.rollout = rollout
            rows.append((label, precision, flops_per_token, timed_train(agent, args.repeats)))
            del agent
    params = sum(p.numel() for p in make_agent("fp32", env, args).actor_critic.lm.parameters())
    bounds = {"fp32": matmul_gflops(dtype=torch.float32), "bf16": matmul_gflops(dtype=torch.bfloat16)}

    print(f"machine: {describe_machine()}")
    print(f"default model ({params / 1e6:.1f} M parameters), {args.envs} envs x {args.response_tokens} tokens: "
          f"{tokens} trained tokens in {positions} positions; {args.epochs} epochs, {args.minibatch_tokens} tokens "
          f"per minibatch, fused AdamW, fastest of {args.repeats}")
    print(f"matmul 2048^3: fp32 {bounds['fp32']:.0f} GFLOP/s, bf16 {bounds['bf16']:.0f} GFLOP/s\n")
    print("| update | precision | LMPPO.train() s | trained tokens/s | bf16 speed-up | fraction of own FLOP bound |")
    print("|---|---|---|---|---|---|")
    fp32_seconds = {label: seconds for label, precision, _, seconds in rows if precision == "fp32"}
    for label, precision, flops_per_token, seconds in rows:
        rate = tokens * args.epochs / seconds
        print(f"| {label} | {precision} | {seconds:.2f} | {rate:.0f} | {fp32_seconds[label] / seconds:.2f}x | "
              f"{flops_per_token * params * rate / (bounds[precision] * 1e9):.0%} |")
    print("\nFLOP bound: 6 x parameters x trained tokens/s for full fine-tuning (forward, input and weight gradients), "
          "4 x for LoRA (no weight gradients of the frozen base), against the matmul in the same precision.")
    keys = list(mismatches["fp32"])
    print("\nRollout (incremental decode) against training (one forward per segment) log-probs of the same tokens, "
          "before any update:\n")
    print("| precision | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for precision, row in mismatches.items():
        print(f"| {precision} | " + " | ".join(v if isinstance(v, str) else f"{v:.2e}" for v in row.values()) + " |")
    print(f"\nbf16 with the old log-probs recomputed by the training forward (LMPPO's default in bf16), first "
          f"minibatch: ratio mean {recomputed['ratio_mean']:.6f}, approx_kl {recomputed['approx_kl']:.2e}, "
          f"clip fraction {recomputed['clip_fraction']:.2e}")


if __name__ == "__main__":
    main()
