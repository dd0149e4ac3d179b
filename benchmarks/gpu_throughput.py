"""On a CUDA device: env steps/s of LanguageModelVectorEnv against ``model.generate`` at the same batch, in bf16
and fp32, one LMPPO iteration, and the precision checks, printed as one table.

Run by ``benchmarks/gpu.sh`` (``python -m benchmarks.gpu_throughput [--sizes 32 128 512]``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3.common.logger import configure

from agents import LMPPO
from benchmarks.env_throughput import random_actions
from benchmarks.machine import describe_machine, matmul_gflops, synchronize
from lm_gym import LanguageModelVectorEnv, load_model
from lm_gym.sb3 import SB3VecEnv

TOKENS = 64


def zero_reward(prompts, responses, **context):
    return [0.0] * len(responses)


def env_rate(model, tokenizer, n: int) -> float:
    env = LanguageModelVectorEnv(n, model=model, tokenizer=tokenizer, max_new_tokens=TOKENS, max_prompt_tokens=64,
                                 truncate_prompt="left", reward=zero_reward, device="cuda")
    actions = random_actions(np.random.default_rng(0), (TOKENS, n), env.single_action_space.n,
                             env.episodes.stop_token_ids.tolist())
    env.reset(seed=0)
    synchronize("cuda")
    started = time.perf_counter()
    for action in actions:
        env.step(action)
    synchronize("cuda")
    rate = TOKENS * n / (time.perf_counter() - started)
    env.close()
    return rate


@torch.no_grad()
def generate_rate(model, tokenizer, n: int) -> float:
    prompt = torch.randint(0, 1000, (n, 48), device="cuda")
    kwargs = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    synchronize("cuda")
    started = time.perf_counter()
    model.generate(prompt, **kwargs)
    synchronize("cuda")
    return TOKENS * n / (time.perf_counter() - started)


def lmppo_iteration(precision: str, envs: int = 64) -> tuple[float, dict]:
    env = SB3VecEnv(envs, max_new_tokens=TOKENS, max_prompt_tokens=64, truncate_prompt="left", reward=zero_reward,
                    device="cuda", precision=precision, reference_logprobs=False)
    agent = LMPPO(env=env, n_steps=TOKENS, batch_size=2048, n_epochs=2, seed=0, device="cuda", precision=precision,
                  policy_kwargs={"model": "default", "device": "cuda"})
    agent.set_logger(configure(None, []))
    _, callback = agent._setup_learn(TOKENS * envs, None)
    synchronize("cuda")
    started = time.perf_counter()
    agent.collect_rollouts(env, callback, None, agent.n_steps)
    agent.train()
    synchronize("cuda")
    checks = {"master weights float32": all(p.dtype == torch.float32 for p in agent.policy.parameters()),
              "ratio mean after recompute": agent.logger.name_to_value.get("train/ratio_mean", float("nan"))}
    return time.perf_counter() - started, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for the GPU machine")
    print(f"machine: {describe_machine()}")
    print(f"matmul 4096^3: fp32 {matmul_gflops(4096, dtype=torch.float32, device='cuda'):.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(4096, dtype=torch.bfloat16, device='cuda'):.0f} GFLOP/s\n")
    print("| what | N | precision | ours tok/s | model.generate tok/s | ours / generate |\n|---|---|---|---|---|---|")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tokenizer = load_model("default", device="cuda", dtype=dtype)
        model.requires_grad_(False)
        for n in args.sizes:
            ours, theirs = env_rate(model, tokenizer, n), generate_rate(model, tokenizer, n)
            print(f"| env steps | {n} | {precision} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
        del model
        torch.cuda.empty_cache()
    for precision in ("fp32", "bf16"):
        seconds, checks = lmppo_iteration(precision)
        print(f"| LMPPO iteration (64 envs x {TOKENS} tokens, 2 epochs) | 64 | {precision} | {seconds:.1f} s | | {checks} |")


if __name__ == "__main__":
    main()
