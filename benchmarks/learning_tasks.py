"""Held-out accuracy against training time on a verifiable task: lm-gym's PPO, GRPO and RLOO, and TRL's GRPO.

Every side trains the default model with LoRA adapters (rank 16 on all linear layers) for the same number of
minutes, one side after the other in one run, each alone on the machine; an adapter is saved every
``--checkpoint-minutes`` and at the end. Afterwards every checkpoint, and the untrained model, is scored on
the task's held-out problems with one evaluator (``lm_gym.tasks.evaluate_task``: greedy accuracy, and
pass@k at the end, with 95% Wilson intervals), so the sides differ only in how they trained.

Matched settings: the task's training problems and checker (TRL's side loads ``lm_gym/tasks/answers.py``);
``--prompts`` prompts per iteration, each in a group of ``--group-size`` sampled responses (PPO: one response
per prompt, on ``prompts * group_size`` prompts), and exactly these episodes (lm-gym's rollout ends once every
row has ended its episode, ``episodes_per_row=1``, as TRL samples one generation batch); responses of at most
``--response-tokens`` tokens at temperature 1; ``--epochs`` epochs of ``--minibatches`` optimizer steps, each
on an equal share of the iteration's responses (lm-gym's GRPO first leaves out groups whose rewards are all
equal); clip 0.2; gradient norm 1; KL coefficient ``--kl-coef`` (GRPO on both sides: k3 in the loss; RLOO and
PPO: k1 in the reward); group-normalised advantages and token-level loss normalisation for GRPO (TRL's
``dapo``); a constant learning rate; bf16 (lm-gym's bf16 acting copy and LoRA on the bf16 LM; TRL's
``bf16=True``, autocast over float32 weights). TRL's ``GRPOTrainer`` runs in its own virtual environment
(``benchmarks/trl_grpo_worker.py``)::

    python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 && VENV/bin/pip install trl==1.16.0 peft
    python -m benchmarks.learning_tasks --task addition --trl-python VENV/bin/python [--minutes 15]

Everything is written into ``--out`` (``results.json``, ``accuracy.png``, the adapters); ``--report`` prints the
table and redraws the plot from an existing ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
import transformers
from stable_baselines3.common.logger import configure

from agents.train import TrainConfig, make_agent, make_rank_env, train_iteration, training_data
from benchmarks.machine import describe_machine
from benchmarks.trl_ppo import OptimizerClock
from lm_gym import load_model
from lm_gym.chat import encode_prompt
from lm_gym.models import default_model_dir
from lm_gym.tasks import TRAIN_PROBLEMS, evaluate_task, make_task
from lm_gym.tasks import answers as answers_module
from lm_gym.tasks.evaluation import TaskAccuracy

WORKER = Path(__file__).with_name("trl_grpo_worker.py")
SIDES = ("grpo", "trl-grpo", "rloo", "ppo")
LABELS = {"grpo": "lm-gym GRPO", "rloo": "lm-gym RLOO", "ppo": "lm-gym PPO", "trl-grpo": "TRL GRPOTrainer"}


def train_config(args, algo: str) -> TrainConfig:
    """lm-gym's settings for ``algo``, matched to TRL's (see the module docstring)."""
    group_size = 1 if algo == "ppo" else args.group_size
    return TrainConfig(
        algo=algo, task=args.task, num_envs=args.prompts * args.group_size, group_size=group_size,
        max_new_tokens=args.response_tokens, learning_rate=args.learning_rate, kl_coef=args.kl_coef,
        n_epochs=args.epochs, minibatches=args.minibatches, episodes_per_row=1, system_prompt=None,
        missing_eos_penalty=0.0, lora_rank=args.lora_rank, precision="bf16", seed=args.seed, eval_prompts=1,
    )


def train_ours(args, algo: str, out_dir: Path) -> dict:
    """Train lm-gym's ``algo`` for ``args.minutes``; per iteration its seconds, reward and optimizer steps,
    and the adapters saved every ``args.checkpoint_minutes`` (saving is not counted)."""
    config, _ = train_config(args, algo).resolved()
    env = make_rank_env(config, training_data(config))
    agent = make_agent(config, env)
    agent.set_logger(configure(None, []))
    optimizer = OptimizerClock(agent.policy.optimizer)
    iterations, checkpoints, elapsed, next_checkpoint = [], [], 0.0, args.checkpoint_minutes * 60
    while elapsed < args.minutes * 60:
        optimizer.reset()
        started = time.perf_counter()
        train_iteration(agent, env, config, len(iterations))
        seconds = time.perf_counter() - started
        elapsed += seconds
        values = agent.logger.name_to_value
        iterations.append({"end_s": elapsed, "iteration_s": seconds, "optimizer_steps": optimizer.steps,
                           "episodes": values.get("rollout/episodes"),
                           "reward": values.get("rollout/reward_mean", math.nan)})
        agent.logger.dump()
        if elapsed >= next_checkpoint or elapsed >= args.minutes * 60:
            directory = out_dir / f"{len(checkpoints):02d}"
            agent.policy.actor_critic.lm.save_pretrained(directory)
            checkpoints.append({"train_s": elapsed, "iteration": len(iterations), "adapter": str(directory)})
            next_checkpoint += args.checkpoint_minutes * 60
        print(f"{algo}: iteration {len(iterations)} in {seconds:.0f} s, reward {iterations[-1]['reward']:.3f}",
              flush=True)
    return {"iterations": iterations, "checkpoints": checkpoints}


def train_trl(args, out_dir: Path) -> dict:
    """TRL's GRPOTrainer with the same settings, in its own interpreter; the worker's JSON line."""
    task = make_task(args.task)
    problems = task.problems("train", TRAIN_PROBLEMS, at_most=True)
    _, tokenizer = load_model("default", device="cpu")
    ids = [encode_prompt(tokenizer, problem.prompt, True) for problem in problems]
    job = {"model_dir": str(default_model_dir()), "prompts": [tokenizer.decode(row) for row in ids], "prompt_ids": ids,
           "answers": [problem.answer for problem in problems], "answers_module": answers_module.__file__,
           "format_credit": task.format_credit, "group_size": args.group_size, "prompts_per_iteration": args.prompts,
           "minibatches": args.minibatches, "epochs": args.epochs, "response_tokens": args.response_tokens,
           "kl_coef": args.kl_coef, "learning_rate": args.learning_rate, "max_grad_norm": 1.0, "clip_range": 0.2,
           "lora_rank": args.lora_rank, "bf16": True, "seed": args.seed, "minutes": args.minutes,
           "checkpoint_minutes": args.checkpoint_minutes, "out_dir": str(out_dir)}
    done = subprocess.run([args.trl_python, str(WORKER)], input=json.dumps(job), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"TRL's worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(args, adapter: str | None, samples: int) -> dict:
    """Held-out greedy accuracy (and pass@``samples``) of the default model with ``adapter`` merged in, with
    which problems it solved greedily (in the task's order) and the first responses."""
    model, tokenizer = load_model("default", device="cpu", dtype=torch.bfloat16)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    result = evaluate_task(model, tokenizer, make_task(args.task), problems=args.eval_problems, samples=samples,
                           max_new_tokens=args.response_tokens, batch_size=args.eval_problems, seed=args.seed)
    scores = {key: [value.correct, value.total] for key, value in result.items() if isinstance(value, TaskAccuracy)}
    return {**scores, "formatted": result["formatted"], "solved": [correct for _, _, correct in result["responses"]],
            "examples": result["responses"][:3]}


def run_side(args, side: str, results: dict, out: Path) -> None:
    """Train one side, score its checkpoints (pass@k at the last) and store it in ``results``."""
    out_dir = out / side
    run = train_trl(args, out_dir) if side == "trl-grpo" else train_ours(args, side, out_dir)
    for number, checkpoint in enumerate(run["checkpoints"]):
        last = number == len(run["checkpoints"]) - 1
        checkpoint.update(score(args, checkpoint["adapter"], args.samples if last else 0))
        print(f"{side}: checkpoint {number + 1}/{len(run['checkpoints'])} ({checkpoint['train_s'] / 60:.1f} min) "
              f"greedy {accuracy(checkpoint).rate:.1%}", flush=True)
    results["sides"][side] = run


def accuracy(record: dict, key: str = "greedy") -> TaskAccuracy:
    return TaskAccuracy(*record[key])


def time_to_reach(run: dict, target: float) -> float | None:
    """Training seconds of the first checkpoint whose greedy accuracy is at least ``target``."""
    return next((c["train_s"] for c in run["checkpoints"] if accuracy(c).rate >= target), None)


def report(results: dict) -> str:
    """The settings, accuracy against time, before/after with pass@k, per-iteration times and the targets."""
    settings, base, sides, k = results["settings"], results["base"], results["sides"], results["settings"]["samples"]
    lines = [f"machine: {results['machine']}", f"settings: {json.dumps(settings)}",
             f"held-out problems: {base['greedy'][1]}; before training: greedy {accuracy(base)}, "
             f"pass@{k} {accuracy(base, f'pass@{k}')}", "",
             "| side | training min | iterations | greedy accuracy (95% interval) | answer format |",
             "|---|---|---|---|---|"]
    for side, run in sides.items():
        for c in run["checkpoints"]:
            lines.append(f"| {LABELS[side]} | {c['train_s'] / 60:.1f} | {c['iteration']} | {accuracy(c)} | "
                         f"{c['formatted']:.0%} |")
    lines += ["", f"| side | iterations | s per iteration | episodes per iteration | optimizer steps per iteration | "
              f"greedy after | pass@{k} after | greedy gain, points | intervals disjoint |",
              "|---|---|---|---|---|---|---|---|---|"]
    for side, run in sides.items():
        last, its = run["checkpoints"][-1], run["iterations"]
        steps = [i.get("optimizer_steps", settings["epochs"] * settings["minibatches"]) for i in its]
        gain = accuracy(last).rate - accuracy(base).rate
        disjoint = accuracy(last).interval[0] > accuracy(base).interval[1]
        lines.append(f"| {LABELS[side]} | {len(its)} | {sum(i['iteration_s'] for i in its) / len(its):.1f} | "
                     f"{episodes_per_iteration(side, its, settings)} | {sum(steps) / len(steps):.1f} | "
                     f"{accuracy(last)} | {accuracy(last, f'pass@{k}')} | "
                     f"{100 * gain:+.1f} | {'yes' if disjoint else 'no'} |")
    if "solved" in base:
        lines += ["", *paired_changes(base, sides)]
    if "grpo" in sides and "trl-grpo" in sides:
        lines += ["", *grpo_against_trl(sides["grpo"], sides["trl-grpo"])]
    return "\n".join(lines)


def episodes_per_iteration(side: str, iterations: list[dict], settings: dict) -> str:
    """The mean number of episodes an iteration sampled (before lm-gym's GRPO leaves out uniform groups): TRL's
    generation batch, or what lm-gym's rollouts logged (unknown in runs from before they did)."""
    if side == "trl-grpo":
        return str(settings["prompts"] * settings["group_size"])
    counts = [i["episodes"] for i in iterations if i.get("episodes") is not None]
    return f"{sum(counts) / len(counts):.1f}" if counts else "not recorded"


def paired_changes(base: dict, sides: dict) -> list[str]:
    """Per side, the held-out problems its last checkpoint newly solves and newly fails, against the untrained
    model on the same problems, with the exact two-sided McNemar p-value of that split."""
    lines = []
    for side, run in sides.items():
        solved = run["checkpoints"][-1]["solved"]
        fixed = sum(after and not before for before, after in zip(base["solved"], solved))
        broken = sum(before and not after for before, after in zip(base["solved"], solved))
        lines.append(f"{LABELS[side]}: {fixed} problems newly solved, {broken} newly failed (exact McNemar "
                     f"p = {mcnemar_p(fixed, broken):.3g})")
    return lines


def mcnemar_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: the binomial tail of the smaller count among ``fixed + broken``."""
    changed = fixed + broken
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, i) for i in range(min(fixed, broken) + 1)) / 2**changed
    return min(1.0, 2 * tail)


def grpo_against_trl(ours: dict, theirs: dict) -> list[str]:
    """The per-iteration ratio and the time lm-gym GRPO takes to reach TRL's final greedy accuracy."""
    per_iteration = [sum(i["iteration_s"] for i in run["iterations"]) / len(run["iterations"]) for run in (ours, theirs)]
    final = accuracy(theirs["checkpoints"][-1]).rate
    total = theirs["checkpoints"][-1]["train_s"]
    reached = time_to_reach(ours, final)
    lines = [f"per iteration, lm-gym GRPO / TRL GRPO: {per_iteration[0]:.1f} s / {per_iteration[1]:.1f} s = "
             f"{per_iteration[0] / per_iteration[1]:.2f}"]
    if reached is None:
        lines.append(f"lm-gym GRPO did not reach TRL's final greedy accuracy ({final:.1%}) at any checkpoint")
    else:
        lines.append(f"lm-gym GRPO reached TRL's final greedy accuracy ({final:.1%}, after {total / 60:.1f} min) at "
                     f"its {reached / 60:.1f}-min checkpoint: {reached / total:.2f}x TRL's time (target <= 0.3x)")
    return lines


def plot(results: dict, path: Path) -> None:
    """Greedy held-out accuracy against training minutes, one line per side, with the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = accuracy(results["base"])
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for side, run in results["sides"].items():
        points = [(0.0, base)] + [(c["train_s"] / 60, accuracy(c)) for c in run["checkpoints"]]
        minutes, rates = [m for m, _ in points], [100 * a.rate for _, a in points]
        errors = [[100 * (a.rate - a.interval[0]) for _, a in points], [100 * (a.interval[1] - a.rate) for _, a in points]]
        axes.errorbar(minutes, rates, yerr=errors, marker="o", capsize=3, label=LABELS[side])
    axes.set_xlabel("training time (minutes)")
    axes.set_ylabel(f"greedy accuracy on {base.total} held-out problems (%)")
    axes.set_title(f"{results['settings']['task']}: default model (135M), LoRA, bf16, 2-core CPU")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args():
    """Command-line settings (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="addition", choices=("addition", "multiplication"))
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"),
                        help="python of a venv with trl==1.16.0 and peft (default: $TRL_PYTHON)")
    parser.add_argument("--minutes", type=float, default=15.0, help="training minutes per side")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=4, help="optimizer steps per epoch")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--kl-coef", type=float, default=0.04)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4, help="k of pass@k, before and after training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("learning-tasks"))
    parser.add_argument("--report", action="store_true", help="print the table and redraw the plot of --out")
    args = parser.parse_args()
    if "trl-grpo" in args.sides and not args.trl_python and not args.report:
        parser.error("give --trl-python or set TRL_PYTHON (a venv with trl==1.16.0, see the module docstring)")
    if (args.prompts * args.group_size) % args.minibatches:
        parser.error("--prompts x --group-size must be a multiple of --minibatches (TRL's rule)")
    return args


def main() -> None:
    """Score the untrained model, train and score each side in turn (results saved after each), report."""
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    path = args.out / "results.json"
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("trl_python", "report", "out")}
        results = {"machine": describe_machine(), "settings": settings, "base": score(args, None, args.samples),
                   "sides": {}}
        for side in args.sides:
            run_side(args, side, results, args.out)
            path.write_text(json.dumps(results, indent=1))
    results = json.loads(path.read_text())
    plot(results, args.out / "accuracy.png")
    print(report(results))


if __name__ == "__main__":
    main()
