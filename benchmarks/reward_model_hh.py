"""A reward model trained on real human preferences: the first N pairs of the HH-RLHF harmlessness sample,
evaluated on the last M (pairwise accuracy with a 95% Wilson interval), with the wall time, in each of
``--precisions`` one after the other in the same run (the same pairs and seed), then bf16's speed-up.

Run from the project root: ``python -m benchmarks.reward_model_hh [--train 800] [--eval 200] [--precisions fp32
bf16]``. The sample lies beside the project (``../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz``) or at
``--data``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from agents import evaluate_reward_model, train_reward_model
from benchmarks.machine import describe_machine
from lm_gym.data import load_preferences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=800, help="training pairs: the first N")
    parser.add_argument("--eval", type=int, default=200, help="held-out pairs: the last M")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--train-layers", type=int, default=6, help="top transformer blocks trained (0: all)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample's 3 empty responses are reported below instead
        pairs = load_preferences(args.data)
    train, held_out = list(pairs[: args.train]), list(pairs[-args.eval :])
    print(f"machine: {describe_machine()}")
    print(f"{args.data.name}: {len(pairs)} usable pairs ({pairs.report.rows_read - pairs.report.kept} skipped); "
          f"train on the first {len(train)}, evaluate on the last {len(held_out)}")
    print(f"settings: model {args.model}, {args.epochs} epoch(s), lr {args.lr}, batch {args.batch_size} pairs, "
          f"max_length {args.max_length}, trained blocks: {args.train_layers or 'all'}")
    runs = {precision: run(args, train, held_out, precision) for precision in args.precisions}
    print("\n| precision | training s | evaluation s | held-out accuracy (95% CI) | speed-up (train + eval) |")
    print("|---|---|---|---|---|")
    first = next(iter(runs.values()))
    for precision, record in runs.items():
        low, high = record["ci95"]
        speedup = (first["train_s"] + first["eval_s"]) / (record["train_s"] + record["eval_s"])
        print(f"| {precision} | {record['train_s']:.0f} | {record['eval_s']:.0f} | {record['accuracy']:.3f} "
              f"({low:.3f}-{high:.3f}) | {speedup:.2f}x |")


def run(args, train: list, held_out: list, precision: str) -> dict:
    """Train and evaluate one reward model in ``precision``; print its lines; the evaluation with timings."""
    started = time.perf_counter()
    rm = train_reward_model(train, args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, train_layers=args.train_layers or None, precision=precision)
    trained = time.perf_counter() - started
    result = evaluate_reward_model(rm, held_out)
    evaluated = time.perf_counter() - started - trained
    low, high = result["ci95"]
    quantiles = ", ".join(f"p{q} {v:.2f}" for q, v in result["margin_quantiles"].items())
    print(f"{precision}: training {trained:.0f} s, evaluation {evaluated:.0f} s; last-epoch training accuracy "
          f"{sum(r['accuracy'] for r in rm.history[-20:]) / len(rm.history[-20:]):.3f} (last 20 steps)")
    print(f"{precision}: held-out pairwise accuracy {result['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, "
          f"{result['pairs']} pairs, {result['ties']} ties); margins: {quantiles}")
    return {**result, "train_s": trained, "eval_s": evaluated}


if __name__ == "__main__":
    main()
