"""The ``lm-gym`` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch

from agents.heap import one_malloc_arena
import lm_gym
from lm_gym.feedback.commands import add_feedback_commands
from lm_gym.sampling import sample_tokens


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lm-gym`` console script."""
    one_malloc_arena()
    parser = argparse.ArgumentParser(prog="lm-gym", description="Reinforcement learning on language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_rlhf(commands)
    _add_generate(commands)
    _add_eval(commands)
    add_feedback_commands(commands)
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
    _add_precision(rollout)
    rollout.set_defaults(handler=run_rollout)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except (lm_gym.ModelNotFoundError, ValueError, FileNotFoundError) as err:
        print(f"lm-gym: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _add_train(commands) -> None:
    from agents.train import TrainConfig

    train = commands.add_parser("train", help="train LMPPO on the default env (the main job)")
    train.add_argument("--config", help="a TOML file of settings (flags override it)")
    train.add_argument("--run-dir", help="where to write the run (default runs/<date-time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--nproc", type=int, default=1,
                       help="train data-parallel on this many processes of this machine (launches torchrun)")
    _add_config_flags(train, TrainConfig)
    train.set_defaults(handler=run_train)


def _add_config_flags(parser, config_class, skip=()) -> None:
    """One flag per field of a config dataclass (default None: not given), with its meaning and default."""
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag, kind = f"--{field.name.replace('_', '-')}", str(field.type).split(" ")[0]
        meaning = config_class.HELP[field.name] + ("" if field.default is None else f" (default {field.default!r})")
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=meaning)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None, help=meaning)


def _add_precision(parser) -> None:
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                        help="'auto' (bf16 where the hardware runs it fast), 'bf16' or 'fp32' "
                             "(default: $LM_GYM_PRECISION, else 'auto')")


def _add_rlhf(commands) -> None:
    from agents.rlhf import PRESETS, RLHFConfig

    rlhf = commands.add_parser("rlhf", help="preferences -> (SFT) -> reward model -> LMPPO -> tuned model")
    rlhf.add_argument("--preset", choices=sorted(PRESETS), help="small settings ('smoke': tiny model, minutes)")
    rlhf.add_argument("--run-dir", help="where to write the run (default runs/rlhf-<date-time>)")
    _add_config_flags(rlhf, RLHFConfig, skip=("prompts",))
    rlhf.set_defaults(handler=run_rlhf)


def run_rlhf(args: argparse.Namespace) -> int:
    """``lm-gym rlhf``: every stage into one run directory, ending with report.md."""
    from agents.rlhf import RLHFConfig, run_rlhf as run_pipeline

    names = {f.name for f in dataclasses.fields(RLHFConfig)} - {"prompts"}
    config = RLHFConfig.preset(args.preset, **{name: getattr(args, name) for name in names})
    run_dir = Path(args.run_dir or f"runs/rlhf-{time.strftime('%Y%m%d-%H%M%S')}")
    run_pipeline(config, run_dir)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``lm-gym train``: build the config from file and flags, then train into the run directory."""
    from agents import distributed
    from agents.train import TrainConfig, timed_run

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args.nproc, args.argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.resume:
        run_dir = Path(args.resume)
        config = TrainConfig.from_toml(run_dir / "config.toml", **overrides)
    else:
        distributed.setup()  # to agree on rank 0's default run directory
        run_dir = Path(distributed.broadcast(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"))
        base = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
        config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    timed_run(config, run_dir, resume=bool(args.resume))
    return 0


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this ``lm-gym`` command again under ``torchrun`` on ``nproc`` local processes; its exit status."""
    rest, skip = [], False
    for token in argv:
        if skip or token == "--nproc" or token.startswith("--nproc="):
            skip = token == "--nproc"
            continue
        rest.append(token)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "agents.cli", *rest]
    return subprocess.call(command)


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="sample a response from a model")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="default", help="a run's model/ directory, 'default', 'tiny', ...")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--seed", type=int, default=0)
    _add_precision(generate)
    generate.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Sample one response with the model's own next-token distribution."""
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0")
    env = lm_gym.LanguageModelEnv(model=args.model, max_new_tokens=args.max_new_tokens, reward=_no_reward,
                                  truncate_prompt="left", precision=args.precision)
    generator = torch.Generator(device=env.episodes.device).manual_seed(args.seed)
    env.reset(seed=args.seed, options={"prompt": args.prompt})
    done = False
    while not done:
        token, _ = sample_tokens(env.next_token_logprobs()[None], args.temperature, generators=[generator])
        _, _, terminated, truncated, info = env.step(int(token[0]))
        done = terminated or truncated
    print(info["response_text"].strip())
    return 0


def _no_reward(prompts, responses, **context):
    return [0.0] * len(responses)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="mean reward, components, KL and length on held-out prompts; "
                                                "with --task, accuracy on a task's held-out problems")
    evaluate.add_argument("--model", help="the model to evaluate (e.g. a run's model/ directory; with --task "
                                          "default 'default')")
    evaluate.add_argument("--reference", default="default", help="the reference model for the KL")
    evaluate.add_argument("--eval-prompts", type=int, default=16)
    evaluate.add_argument("--alpha", type=float, default=0.5)
    evaluate.add_argument("--task", help="a verifiable task ('addition', 'reverse', 'reasoning-gym:NAME'): greedy "
                                         "accuracy and pass@k on its held-out problems, with 95%% intervals; a task "
                                         "with tools ('calculator'): greedy accuracy and tool use in multi-turn episodes")
    evaluate.add_argument("--problems", type=int, default=200, help="held-out problems of --task")
    evaluate.add_argument("--samples", type=int, default=8, help="k of pass@k with --task (0: greedy accuracy only)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="response length limit with --task")
    evaluate.add_argument("--system-prompt", default=None, help="a system message before each --task problem "
                                                                "(as the training run had it; default none)")
    evaluate.add_argument("--seed", type=int, default=0)
    _add_precision(evaluate)
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a model as a policy on the held-out default prompts, against a reference model, or its accuracy
    on a task's held-out problems."""
    if args.task is not None:
        return run_task_eval(args)
    if args.model is None:
        raise ValueError("lm-gym eval needs --model (or --task, which defaults to the default model)")
    from agents.ppo import LMPPO
    from agents.evaluation import evaluate
    from agents.train import TrainConfig, make_env, split_prompts

    config, _ = TrainConfig(model=args.reference, alpha=args.alpha, eval_prompts=args.eval_prompts, seed=args.seed,
                            precision=args.precision).resolved()
    _, prompts = split_prompts(config)
    env = make_env(config, prompts, len(prompts), args.reference, None)
    agent = LMPPO(env=env, n_steps=config.max_new_tokens, policy_kwargs={"model": args.model}, seed=args.seed,
                  precision=config.precision)
    record = evaluate(agent, env, prompts, args.seed)
    parts = ", ".join(f"{k}={v:.3f}" for k, v in record["components"].items())
    print(f"reward {record['reward']:.3f} ({parts}); KL {record['kl']:.3f}; length {record['length']:.0f} chars")
    return 0


def run_task_eval(args: argparse.Namespace) -> int:
    """Greedy accuracy and pass@k of a model on a task's held-out problems, with 95% Wilson intervals."""
    from lm_gym.precision import resolve_precision
    from lm_gym.tasks import evaluate_task, make_task

    precision = resolve_precision(args.precision, None)
    model, tokenizer = lm_gym.load_model(args.model or "default", dtype=precision.dtype)
    task = make_task(args.task)
    if task.tools:
        return run_tool_task_eval(model, tokenizer, task, args)
    result = evaluate_task(model, tokenizer, task, problems=args.problems, samples=args.samples,
                           max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt or None, seed=args.seed)
    print(f"{args.task}, {args.problems} held-out problems:")
    print(f"  greedy accuracy  {result['greedy']}")
    if args.samples:
        print(f"  pass@{args.samples:<10} {result[f'pass@{args.samples}']}")
    print(f"  answer format    {result['formatted']:.1%} of greedy responses")
    return 0


def run_tool_task_eval(model, tokenizer, task, args: argparse.Namespace) -> int:
    """Greedy accuracy and tool use on a tool task's held-out problems, each one multi-turn episode."""
    from lm_gym.tasks import evaluate_tool_task

    result = evaluate_tool_task(model, tokenizer, task, problems=args.problems, max_new_tokens=args.max_new_tokens,
                                system_prompt=args.system_prompt or None, seed=args.seed)
    print(f"{args.task}, {args.problems} held-out problems, greedy episodes with the task's tools:")
    print(f"  accuracy           {result['accuracy']}")
    print(f"  called a tool      {result['called']}")
    print(f"  valid calls        {result['valid_calls']}")
    print(f"  errors             {result['errors'] or 'none'}")
    return 0


def run_rollout(args: argparse.Namespace) -> int:
    """Play ``args.episodes`` episodes and print prompt, response, reward and speed for each."""
    if args.episodes < 1 or args.temperature <= 0:
        raise ValueError("--episodes must be >= 1 and --temperature > 0")
    env = gym.make(lm_gym.ENV_ID, model=args.model, max_new_tokens=args.max_new_tokens, device=args.device,
                   precision=args.precision)
    base = env.unwrapped
    generator = torch.Generator(device=base.episodes.device).manual_seed(args.seed)
    env.action_space.seed(args.seed)
    total_tokens, started = 0, time.perf_counter()
    for episode in range(args.episodes):
        obs, info = env.reset(seed=args.seed + episode)
        done = False
        while not done:
            if args.policy == "random":
                action = int(env.action_space.sample())
            else:
                token, _ = sample_tokens(base.next_token_logprobs()[None], args.temperature, generators=[generator])
                action = int(token[0])
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
