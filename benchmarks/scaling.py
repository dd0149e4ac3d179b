"""Data-parallel scaling of LMPPO: samples (env steps) per second for 1 rank and for K ranks.

Every configuration trains the same job: ``--envs`` env rows in all (split over the ranks), responses of
``--response-tokens`` tokens, the default task's prompts and reward, 2 PPO epochs. Each rank times whole
iterations (rollout, reference scoring, update); the first is a warm-up and is not counted. Three kinds of
run: one process with every core's thread, one process with one thread, and K ranks of one thread each.
The speed-up is against one process of one thread, so parallel efficiency = speed-up / K (bound 1) tells
what the data-parallel machinery costs per added core.

Run from the project root: ``python -m benchmarks.scaling [--ranks 1 2] [--model default] [--envs 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import describe_machine


def worker(args: argparse.Namespace) -> None:
    """One rank: build the env shard and LMPPO, time ``--iterations`` iterations, rank 0 writes the result."""
    import torch

    from agents import distributed
    from agents.train import TrainConfig, training_data, make_agent, make_rank_env, train_iteration

    distributed.setup()
    torch.set_num_threads(args.threads)
    config = TrainConfig(model=args.model, num_envs=args.envs, max_new_tokens=args.response_tokens,
                         batch_size=args.envs * args.response_tokens, critic_warmup=0).resolved()[0]
    env = make_rank_env(config, training_data(config))
    agent = make_agent(config, env)
    seconds = []
    for iteration in range(args.iterations + 1):
        started = time.perf_counter()
        train_iteration(agent, env, config, iteration)
        distributed.barrier()
        seconds.append(time.perf_counter() - started)
    if distributed.is_main():
        steps = args.envs * args.response_tokens
        record = {"ranks": distributed.world_size(), "threads": args.threads, "seconds": seconds[1:],
                  "steps_per_iteration": steps, "machine": describe_machine()}
        Path(args.out).write_text(json.dumps(record))


def launch(ranks: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    """Run the worker on ``ranks`` processes of ``threads`` threads (torchrun for more than one) and read rank
    0's record."""
    flags = ["--worker", f"--out={out}", f"--threads={threads}", f"--model={args.model}", f"--envs={args.envs}",
             f"--response-tokens={args.response_tokens}", f"--iterations={args.iterations}"]
    if ranks == 1:
        command = [sys.executable, "-m", "benchmarks.scaling", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "benchmarks.scaling", *flags]
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="K, the ranks of the data-parallel run")
    parser.add_argument("--model", default="default")
    parser.add_argument("--envs", type=int, default=8, help="env rows in all, split over the ranks")
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs = [(1, os.cpu_count()), (1, 1), (args.ranks, 1)]
    with tempfile.TemporaryDirectory() as scratch:
        records = [launch(ranks, threads, args, Path(scratch) / f"{ranks}x{threads}.json") for ranks, threads in runs]
    print(f"machine: {records[0]['machine']}")
    print(f"job: {args.model}, {args.envs} env rows in all, {args.response_tokens}-token responses, 2 PPO epochs")
    rates = [r["steps_per_iteration"] * len(r["seconds"]) / sum(r["seconds"]) for r in records]
    print("| ranks x threads | s / iteration | samples/s | speed-up over 1 x 1 | parallel efficiency |")
    print("|---|---|---|---|---|")
    for record, rate in zip(records, rates):
        speedup = rate / rates[1]
        print(f"| {record['ranks']} x {record['threads']} | {record['steps_per_iteration'] / rate:.2f} | {rate:.1f} | "
              f"{speedup:.2f} | {speedup / record['ranks']:.2f} |")

if __name__ == "__main__":
    main()
