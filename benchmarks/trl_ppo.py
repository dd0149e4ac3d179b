"""One PPO iteration of TRL's ``PPOTrainer`` vs one of ``LMPPO``: same model, prompts, lengths, epochs, minibatches.

TRL's PPO trainer exists only up to ``trl==1.12.0`` (``trl.experimental.ppo``), so it runs in its own virtual
environment, in ``benchmarks/trl_ppo_worker.py``, started from here as a subprocess::

    python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 && VENV/bin/pip install trl==1.12.0
    python -m benchmarks.trl_ppo --trl-python VENV/bin/python [--prompts 16] [--response-tokens 32]

``--trl-python`` defaults to the environment variable ``TRL_PYTHON``. On both sides: the default model is the
policy and, as a second copy, the reference; the value function has its own backbone (TRL's value model is
a separate model; ``--value-head shared`` puts ours on the policy instead); the reward model is the default
model loaded as a one-label sequence classifier with a seeded head, saved once so both sides load the same
weights; the first N default prompts, chat-formatted by lm_gym and passed to TRL as token ids; responses of
at most T sampled tokens (temperature 1) that stop at EOS; E epochs of M minibatches, one optimizer step
each; constant learning rate; on the CPU in ``--precision`` (fp32, or bf16: TRL's ``bf16=True``, autocast over
float32 weights, against lm_gym's bf16 for the env, the policy and the reward model). Each side runs a first (warm-up) iteration and a measured
one, one side after the other in the same run; the table compares the measured iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from transformers import AutoModelForSequenceClassification

from agents import LMPPO
from benchmarks.machine import describe_machine
from lm_gym import load_model
from lm_gym.chat import encode_prompt
from lm_gym.data import default_prompts
from lm_gym.models import default_model_dir
from lm_gym.rewards import RewardModelReward
from lm_gym.sb3 import SB3VecEnv

WORKER = Path(__file__).with_name("trl_ppo_worker.py")
ITERATIONS = 2  # a warm-up iteration, then the measured one


class TimedRewardModel(RewardModelReward):
    """:class:`RewardModelReward` that adds the seconds of its calls to ``seconds``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def __call__(self, prompts, responses, **context):
        started = time.perf_counter()
        try:
            return super().__call__(prompts, responses, **context)
        finally:
            self.seconds += time.perf_counter() - started


class RolloutClock(BaseCallback):
    """Marks the end of SB3's rollout phase; ``learn()`` then runs the update."""

    def _on_rollout_end(self) -> None:
        self.rollout_ended = time.perf_counter()

    def _on_step(self) -> bool:
        return True


class OptimizerClock:
    """Seconds and number of the steps of an optimizer (step hooks) since the last :meth:`reset`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.reset()
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "started", time.perf_counter()))
        optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, *_) -> None:
        self.seconds += time.perf_counter() - self.started
        self.steps += 1

    def reset(self) -> None:
        """Count from zero again."""
        self.seconds, self.steps = 0.0, 0


def prepare(args, reward_dir: Path) -> tuple[list[str], list[list[int]]]:
    """(prompts, their chat-formatted token ids) for both sides; the reward model saved into ``reward_dir``."""
    _, tokenizer = load_model("default", device="cpu")
    prompts = default_prompts()[: args.prompts]
    ids = [encode_prompt(tokenizer, prompt, True) for prompt in prompts]
    torch.manual_seed(args.seed)  # the classifier's new head
    reward = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=1)
    reward.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return prompts, ids


def run_trl(args, ids: list[list[int]], reward_dir: Path) -> dict:
    """TRL's iterations in its own interpreter; the worker's JSON line."""
    job = {"model_dir": str(default_model_dir()), "reward_dir": str(reward_dir), "prompts": ids,
           "response_tokens": args.response_tokens, "epochs": args.epochs, "minibatches": args.minibatches,
           "iterations": ITERATIONS, "learning_rate": args.learning_rate, "temperature": 1.0, "seed": args.seed,
           "bf16": args.precision == "bf16"}
    command = [args.trl_python, str(WORKER)]
    done = subprocess.run(command, input=json.dumps(job), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"TRL's worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(args, prompts: list[str], ids: list[list[int]], reward_dir: Path) -> list[dict]:
    """LMPPO's iterations: each starts every env row on its prompt and runs ``learn()`` for one rollout."""
    reward = TimedRewardModel(reward_dir, device="cpu", precision=args.precision)
    env = SB3VecEnv(len(prompts), model="default", prompts=prompts, reward=reward, device="cpu",
                    max_new_tokens=args.response_tokens, max_prompt_tokens=max(map(len, ids)),
                    reference_logprobs=False, precision=args.precision)
    tokens = len(prompts) * args.response_tokens
    agent = LMPPO(env=env, n_steps=args.response_tokens, batch_size=tokens // args.minibatches, n_epochs=args.epochs,
                  learning_rate=args.learning_rate, seed=args.seed, device="cpu",
                  policy_kwargs={"model": "default", "value_head": args.value_head, "device": "cpu",
                                 "precision": args.precision})
    agent.set_logger(configure(None, []))
    optimizer = OptimizerClock(agent.policy.optimizer)
    return [_our_iteration(agent, env, prompts, reward, optimizer) for _ in range(ITERATIONS)]


def _our_iteration(agent: LMPPO, env: SB3VecEnv, prompts: list[str], reward: TimedRewardModel,
                   optimizer: OptimizerClock) -> dict:
    env.set_options([{"prompt": prompt} for prompt in prompts])  # learn() resets the env with these
    clock = RolloutClock()
    reward.seconds = 0.0
    optimizer.reset()
    started = time.perf_counter()
    agent.learn(total_timesteps=env.num_envs * agent.n_steps, callback=clock)
    ended = time.perf_counter()
    segments = agent.rollout.segments
    return {"iteration_s": ended - started, "rollout_s": clock.rollout_ended - started,
            "update_s": ended - clock.rollout_ended, "reward_model_s": reward.seconds,
            "optimizer_s": optimizer.seconds, "optimizer_steps": optimizer.steps,
            "response_tokens": sum(len(s.tokens) for s in segments), "segments": len(segments),
            "episodes": sum(s.ended for s in segments), "eos_rows": sum(s.terminated for s in segments)}


def print_report(args, trl: dict, ours: list[dict]) -> None:
    """The settings, the table of the measured iterations and the ratio ours/TRL."""
    theirs, mine = trl["iterations"][-1], ours[-1]
    print(f"machine: {describe_machine()}")
    print(f"TRL side: {', '.join(f'{k} {v}' for k, v in trl['versions'].items())} ({trl['threads']} threads)")
    print(f"default model; {args.prompts} prompts, responses of at most {args.response_tokens} tokens (stop at EOS), "
          f"PPO epochs {args.epochs}, minibatches per epoch {args.minibatches}; value backbone: {args.value_head}; "
          f"precision {args.precision}\n")
    print("| phase | TRL PPOTrainer s | LMPPO s | ours/TRL |\n|---|---|---|---|")
    rows = [("whole iteration", "iteration_s"), ("rollout (sampling, reference, values, reward)", "rollout_s"),
            ("of which reward model", "reward_model_s"), ("update (PPO epochs)", "update_s"),
            ("of which optimizer steps", "optimizer_s")]
    for label, key in rows:
        print(f"| {label} | {theirs[key]:.1f} | {mine[key]:.1f} | {mine[key] / theirs[key]:.2f} |")
    print(f"| first iteration (warm-up) | {trl['iterations'][0]['iteration_s']:.1f} | {ours[0]['iteration_s']:.1f} | "
          f"{ours[0]['iteration_s'] / trl['iterations'][0]['iteration_s']:.2f} |")
    print(f"\nTRL: {theirs['generation_s']:.1f} s sampling; {theirs['generated_positions']} positions generated, "
          f"{theirs['response_tokens']} tokens up to EOS, {theirs['eos_rows']}/{args.prompts} responses ended with "
          f"EOS; {theirs['optimizer_steps']} optimizer steps")
    print(f"LMPPO: {mine['response_tokens']} response tokens in {mine['segments']} segments, {mine['episodes']} of "
          f"them finished episodes ({mine['eos_rows']} ended with EOS); {mine['optimizer_steps']} optimizer steps")
    ratio = mine["iteration_s"] / theirs["iteration_s"]
    print(f"ours/TRL per iteration: {ratio:.2f} (target <= 0.8: {'met' if ratio <= 0.8 else 'not met'})")


def parse_args():
    """Command-line settings (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"),
                        help="python of a venv with trl==1.12.0 (default: $TRL_PYTHON)")
    parser.add_argument("--prompts", type=int, default=16, help="rollout batch: prompts per iteration")
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=2, help="minibatches (optimizer steps) per epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--value-head", choices=("separate", "shared"), default="separate")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides' precision")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.trl_python:
        parser.error("give --trl-python or set TRL_PYTHON (a venv with trl==1.12.0, see the module docstring)")
    if args.prompts % args.minibatches:
        parser.error(f"--prompts {args.prompts} must be a multiple of --minibatches {args.minibatches} (TRL's rule)")
    return args


def main() -> None:
    """Prepare the shared inputs, run TRL's side, then ours, and print the report."""
    args = parse_args()
    transformers.logging.set_verbosity_error()  # the classifier's new head is expected
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        reward_dir = Path(directory)
        prompts, ids = prepare(args, reward_dir)
        trl = run_trl(args, ids, reward_dir)
        ours = run_ours(args, prompts, ids, reward_dir)
    print_report(args, trl, ours)


if __name__ == "__main__":
    main()
