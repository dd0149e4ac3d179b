"""Agent tokens per second in tool-using episodes against the same episodes without tools, side by side.

Both envs are ``LanguageModelVectorEnv(N)`` on the ``calculator`` task's prompts (the tool env's system text
in both, so the contexts match) and play the same scripted agent, the same ids in both: every row writes a
preamble of its own length (so rows fall out of step, as sampled ones do), a calculator call, and a short
answer. With tools the call's closing tag ends a turn and the env inserts the result's turn (one batched
forward of the new ids of the rows that called); without tools the same ids are one turn. Each env is timed alone, and again with a policy acting
on every observation through the rollout cache (the agent's side of an LMPPO rollout), all in one run, with
the weight-streaming bound of an N-row decode step in the precision measured.

Run from the project root: ``python -m benchmarks.tool_throughput [--num-envs 32] [--steps 192]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from agents.rollout_cache import RolloutCache
from benchmarks.env_throughput import decode_bounds
from benchmarks.machine import describe_machine
from lm_gym import LanguageModelVectorEnv, load_model
from lm_gym.tasks import make_task

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "347 * 829"}}</tool_call>'
ANSWER = "347 * 829 = 287663. The answer is 287663."
PREAMBLE = " Let me use the calculator for this one, step by step."


class ScriptedAgent:
    """Per row: a preamble of a random number of tokens, the call, the answer, EOS."""

    def __init__(self, tokenizer, num_rows: int, seed: int = 0):
        encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.preamble = encode(PREAMBLE)
        self.body = encode(CALL) + encode(ANSWER) + [tokenizer.eos_token_id]
        self.rng = np.random.default_rng(seed)
        self.scripts = [self._script() for _ in range(num_rows)]
        self.positions = [0] * num_rows

    def _script(self) -> list[int]:
        return self.preamble[: int(self.rng.integers(0, len(self.preamble) + 1))] + self.body

    def actions(self) -> np.ndarray:
        return np.array([script[min(k, len(script) - 1)] for script, k in zip(self.scripts, self.positions)])

    def advance(self, done: np.ndarray) -> None:
        for row, ended in enumerate(done):
            self.positions[row] += 1
            if ended:  # SAME_STEP autoreset: the row's next action starts its next episode
                self.scripts[row], self.positions[row] = self._script(), 0


def make_env(model, tokenizer, num_envs: int, with_tools: bool, system_text: str | None):
    task = make_task("calculator")
    problems = task.problems("train", 256)
    settings = dict(model=model, tokenizer=tokenizer, prompts=[p.prompt for p in problems],
                    reward=task.reward(problems), max_prompt_tokens=512, autoreset_mode=AutoresetMode.SAME_STEP)
    if with_tools:
        return LanguageModelVectorEnv(num_envs, tools=list(task.tools), max_new_tokens=96,
                                      multi_turn=dict(max_turns=3, context_tokens=768), **settings)
    return LanguageModelVectorEnv(num_envs, system_prompt=system_text, max_new_tokens=192, **settings)


@torch.no_grad()
def agent_rate(env, tokenizer, steps: int, policy=None) -> tuple[float, int]:
    """Agent tokens per second over ``steps`` steps of every row (every step takes one agent token per row),
    and the number of tool results inserted."""
    agent, cache = ScriptedAgent(tokenizer, env.num_envs), RolloutCache()
    obs, _ = env.reset(seed=0)
    inserted = 0
    started = time.perf_counter()
    for _ in range(steps):
        if policy is not None:
            cache.latest(policy, tokenizer.pad_token_id, torch.as_tensor(obs["input_ids"]),
                         torch.as_tensor(obs["attention_mask"]))
        obs, _, terminated, truncated, infos = env.step(agent.actions())
        done = terminated | truncated
        inserted += sum(1 for row, ended in enumerate(infos.get("_turn_ended", [])) if ended and not done[row])
        cache.reset(np.flatnonzero(done).tolist())
        agent.advance(done)
    return steps * env.num_envs / (time.perf_counter() - started), inserted


def measure(model, tokenizer, args) -> dict:
    tool_env = make_env(model, tokenizer, args.num_envs, True, None)
    system_text = tool_env.episodes.party.system_text()
    plain_env = make_env(model, tokenizer, args.num_envs, False, system_text)
    rows = {}
    for name, env in (("without tools", plain_env), ("with tools", tool_env)):
        rows[name] = agent_rate(env, tokenizer, args.steps), agent_rate(env, tokenizer, args.steps, policy=model)
        env.close()
    return {"rows": rows, "bound": decode_bounds(model, args.num_envs, 256)[0],
            "system_tokens": len(tokenizer(system_text or "").input_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=192, help="steps timed per variant (each one token per row)")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    for precision in args.precisions:
        model, tokenizer = load_model(args.model, device="cpu", dtype=precision)
        model.requires_grad_(False)
        result = measure(model, tokenizer, args)
        print(f"\n{precision}, model {args.model}, N = {args.num_envs}, {args.steps} steps per variant, tool "
              f"instructions {result['system_tokens']} tokens in every prompt; weight-streaming bound of an "
              f"N-row decode step {result['bound']:.0f} tokens/s\n")
        print("| episodes | env alone: agent tok/s | tool results inserted | env + acting policy: agent tok/s "
              "| env alone / bound |")
        print("|---|---|---|---|---|")
        for name, ((alone, inserted), (acting, _)) in result["rows"].items():
            print(f"| {name} | {alone:.1f} | {inserted} | {acting:.1f} | {alone / result['bound']:.0%} |")
        (plain, _), (plain_acting, _) = result["rows"]["without tools"]
        (tools, _), (tools_acting, _) = result["rows"]["with tools"]
        print(f"\nwith tools / without: env alone {tools / plain:.2f}x, env + acting policy "
              f"{tools_acting / plain_acting:.2f}x")


if __name__ == "__main__":
    main()
