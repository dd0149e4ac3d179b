"""Env steps per second (one step = one token of one episode) with random actions, side by side.

(a) naive single env: a full forward over the whole prefix every step, no cache (the RL4LMs/TextRL pattern)
(b) our LanguageModelEnv (batch-1 KV-cached steps)
(c) gymnasium SyncVectorEnv of N of our single envs (N batch-1 forwards per step)
(d) our LanguageModelVectorEnv (one batched KV-cached forward per step)

Each in float32 and in bf16 (``--precisions``), with the bounds measured in the same run in that precision:
the FLOP bound (a large matmul's rate / (2 x parameters)) and the weight-streaming bound (the model's linear
layers alone on N one-token inputs: N / their time).
Rates are steady-state steps after a reset; the vector env's rate including its reset is shown too.

Run from the project root: ``python -m benchmarks.env_throughput [--model default] [--sizes 1 8 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import SyncVectorEnv

from benchmarks.machine import describe_machine, matmul_gflops
from lm_gym import LanguageModelEnv, LanguageModelVectorEnv, load_model

RESPONSE_TOKENS = 64
PROMPT_TOKENS = 64


class NaiveLanguageModelEnv:
    """The baseline: every step runs the whole prefix through the model again (no KV cache)."""

    def __init__(self, model, prompt_ids: list[int]):
        self.model, self.ids = model, list(prompt_ids)

    @torch.no_grad()
    def step(self, action: int) -> float:
        logits = self.model(torch.tensor([self.ids]), use_cache=False).logits[0, -1]
        self.ids.append(action)
        return float(torch.log_softmax(logits.float(), -1)[action])


def random_actions(rng: np.random.Generator, shape, vocab: int, stop_ids) -> np.ndarray:
    """Uniform token ids that are never a stop token, so every episode runs its full length."""
    actions = rng.integers(0, vocab, size=shape)
    while np.isin(actions, stop_ids).any():
        bad = np.isin(actions, stop_ids)
        actions[bad] = rng.integers(0, vocab, size=int(bad.sum()))
    return actions


def time_naive(model, tokenizer, env_kwargs, steps: int) -> float:
    env = LanguageModelEnv(**env_kwargs)
    env.reset(seed=0)
    prompt_ids = env.episodes.batch.row_tokens(0)
    naive = NaiveLanguageModelEnv(model, prompt_ids)
    actions = random_actions(np.random.default_rng(0), steps, env.action_space.n, env.episodes.stop_token_ids.tolist())
    started = time.perf_counter()
    for action in actions:
        naive.step(int(action))
    return steps / (time.perf_counter() - started)


def time_env(env, num_envs: int, steps: int, vocab: int, stop_ids) -> tuple[float, float]:
    """Tokens per second of ``steps`` steps of every row, without and with the reset (prompt prefill) before."""
    shape = (steps, num_envs) if num_envs else steps
    actions = random_actions(np.random.default_rng(0), shape, vocab, stop_ids)
    started = time.perf_counter()
    env.reset(seed=0)
    stepping = time.perf_counter()
    for action in actions:
        env.step(action if num_envs else int(action))
    ended = time.perf_counter()
    tokens = steps * max(num_envs, 1)
    return tokens / (ended - stepping), tokens / (ended - started)


@torch.no_grad()
def decode_bounds(model, batch: int, kv_length: int, repeats: int = 5) -> tuple[float, float]:
    """Tokens/s if a decode step cost only (1) the model's linear layers on ``batch`` one-token inputs,
    (2) those plus bare grouped-query attention of each layer over a ``kv_length`` KV cache."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype  # the bound in the precision being measured
    inputs = [torch.randn(batch, m.in_features, dtype=dtype) for m in linears]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    query = torch.randn(batch, config.num_attention_heads, 1, head_dim, dtype=dtype)
    caches = [
        (torch.randn(batch, config.num_key_value_heads, kv_length, head_dim, dtype=dtype),) * 2
        for _ in range(config.num_hidden_layers)
    ]

    def run_linears():
        for m, x in zip(linears, inputs):
            F.linear(x, m.weight, m.bias)

    def run_attention():
        for keys, values in caches:
            F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

    seconds = []
    for work in (run_linears, run_attention):
        work()
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        seconds.append((time.perf_counter() - started) / repeats)
    return batch / seconds[0], batch / (seconds[0] + seconds[1])


def measure(model, tokenizer, args) -> dict:
    """Every variant's tokens/s and the bounds, for ``model`` in its own dtype."""
    env_kwargs = dict(
        model=model, tokenizer=tokenizer, max_new_tokens=RESPONSE_TOKENS, max_prompt_tokens=PROMPT_TOKENS,
        truncate_prompt="left",
    )
    single = LanguageModelEnv(**env_kwargs)
    vocab, stops = single.action_space.n, single.episodes.stop_token_ids.tolist()
    result = {"naive": time_naive(model, tokenizer, env_kwargs, args.naive_steps),
              "single": time_env(single, 0, RESPONSE_TOKENS, vocab, stops)[0],
              "gflops": matmul_gflops(dtype=model.dtype), "rows": []}
    for n in args.sizes:
        sync = SyncVectorEnv([lambda: LanguageModelEnv(**env_kwargs) for _ in range(n)])
        sync_rate, _ = time_env(sync, n, RESPONSE_TOKENS if n == 1 else args.sync_steps, vocab, stops)
        sync.close()
        vector = LanguageModelVectorEnv(n, **env_kwargs)
        vector_rate, with_reset = time_env(vector, n, RESPONSE_TOKENS, vocab, stops)
        kv_length = round(float(vector.episodes.batch.lengths.float().mean())) - RESPONSE_TOKENS // 2
        result["rows"].append((n, sync_rate, vector_rate, with_reset, *decode_bounds(model, n, kv_length)))
        vector.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--naive-steps", type=int, default=RESPONSE_TOKENS)
    parser.add_argument("--sync-steps", type=int, default=16, help="steps timed for SyncVectorEnv at N > 1")
    args = parser.parse_args()
    results = {}
    for precision in args.precisions:
        model, tokenizer = load_model(args.model, device="cpu", dtype=precision)
        model.requires_grad_(False)
        results[precision] = measure(model, tokenizer, args)
    params = sum(p.numel() for p in model.parameters())

    print(f"machine: {describe_machine()}")
    print(f"model: {args.model} ({params / 1e6:.1f} M parameters), response {RESPONSE_TOKENS} tokens, "
          f"prompt <= {PROMPT_TOKENS} tokens, random non-stop actions")
    for precision, result in results.items():
        naive, single, flop_bound = result["naive"], result["single"], result["gflops"] * 1e9 / (2 * params)
        print(f"\n{precision}: (a) naive single env, full forward per step: {naive:.1f} tokens/s; (b) LanguageModelEnv: "
              f"{single:.1f} tokens/s ({single / naive:.1f}x a); matmul {result['gflops']:.0f} GFLOP/s -> FLOP bound "
              f"{flop_bound:.0f} tokens/s\n")
        print("| N | (c) SyncVectorEnv tok/s | (d) LanguageModelVectorEnv tok/s | d/a | d/c "
              "| weight-streaming bound tok/s | d / streaming bound | + KV-cache attention bound tok/s | d / that bound "
              "| d / FLOP bound | d incl. reset tok/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n, sync_rate, vector_rate, with_reset, streaming, with_attention in result["rows"]:
            print(f"| {n} | {sync_rate:.1f} | {vector_rate:.1f} | {vector_rate / naive:.1f} | {vector_rate / sync_rate:.1f} "
                  f"| {streaming:.1f} | {vector_rate / streaming:.0%} | {with_attention:.1f} "
                  f"| {vector_rate / with_attention:.0%} | {vector_rate / flop_bound:.0%} | {with_reset:.1f} |")
    if len(results) == 2:
        ratios = ", ".join(f"N={row[0]}: {bf[2] / row[2]:.2f}x" for row, bf in zip(results["fp32"]["rows"],
                                                                                    results["bf16"]["rows"]))
        print(f"\nLanguageModelVectorEnv bf16 / fp32: {ratios}")
    print("\nSteady-state steps after reset(); the last column adds the reset (prompt prefill of every row).")
    print("Bounds in each precision's own dtype: the linear layers alone on N one-token inputs (weight streaming), "
          "plus bare attention over a KV cache of the episode's mean length.")


if __name__ == "__main__":
    main()
