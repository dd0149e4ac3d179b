"""What a training run writes for people to read: ``metrics.csv`` per iteration, then ``curves.png`` and
``samples.md`` (the held-out change of the reward and each component, with standard errors, and samples)."""

from __future__ import annotations

import csv
from pathlib import Path

METRICS = ["rollout/reward_mean", "rollout/kl_per_segment", "rollout/response_length", "rollout/eos_rate",
           "train/approx_kl", "train/clip_fraction", "train/value_loss", "train/explained_variance",
           "time/rollout_tokens_per_s", "time/train_tokens_per_s"]


def append_metrics(run_dir: Path, iteration: int, agent) -> None:
    """Append the iteration's :data:`METRICS` (from the agent's logger) to ``metrics.csv``."""
    path = run_dir / "metrics.csv"
    new = not path.exists() or iteration == 0
    with open(path, "w" if new else "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["iteration", "timesteps", *METRICS])
        values = agent.logger.name_to_value
        writer.writerow([iteration, agent.num_timesteps, *(values.get(key, "") for key in METRICS)])


def write_report(run_dir: Path, state: dict) -> None:
    """``curves.png`` from metrics.csv and ``samples.md`` with before/after held-out responses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["timesteps"]) for r in rows]
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    for axis, (key, title) in zip(axes, [("rollout/reward_mean", "reward"), ("rollout/kl_per_segment", "KL to reference"),
                                         ("rollout/response_length", "response length (tokens)"),
                                         ("rollout/eos_rate", "responses that ended (EOS rate)")]):
        axis.plot(steps, [float(r[key]) if r[key] else float("nan") for r in rows], marker="o")
        axis.set_title(title)
        axis.set_xlabel("env steps (tokens)")
    figure.tight_layout()
    figure.savefig(run_dir / "curves.png", dpi=100)
    plt.close(figure)
    lines = ["# Held-out samples", "", *change_table(state), ""]
    for label in ("before", "after"):
        record = state[label]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in record["components"].items())
        lines += [f"## {label} training", "", f"mean reward {record['reward']:.3f} ± {record['reward_stderr']:.3f} "
                  f"over {len(record['samples'])} responses ({parts}); KL {record['kl']:.3f}; "
                  f"length {record['length']:.1f} characters", ""]
        first: dict = {}
        for prompt, response in record["samples"]:
            first.setdefault(prompt, response)  # one response per prompt: the first sampled
        lines += [f"- **{prompt}**\n  {response.strip()}" for prompt, response in first.items()] + [""]
    (run_dir / "samples.md").write_text("\n".join(lines))


def change_table(state: dict) -> list[str]:
    """A Markdown table of the held-out reward, each of its components, the EOS rate and the KL before and
    after training, with each change in standard errors of the two independent means combined."""
    before, after = state["before"], state["after"]
    rows = [("reward", before["reward"], before["reward_stderr"], after["reward"], after["reward_stderr"])]
    rows += [(name, before["components"][name], before["component_stderrs"][name], after["components"][name],
              after["component_stderrs"][name]) for name in before["components"]]
    lines = ["| held out | before | after | change |", "|---|---|---|---|"]
    for name, mean_before, se_before, mean_after, se_after in rows:
        change, combined = mean_after - mean_before, (se_before**2 + se_after**2) ** 0.5
        in_errors = f"{change / combined:+.1f} SE" if combined > 0 else "no spread"
        lines.append(f"| {name} | {mean_before:.3f} ± {se_before:.3f} | {mean_after:.3f} ± {se_after:.3f} | "
                     f"{change:+.3f} ({in_errors}) |")
    lines.append(f"| EOS rate | {before['eos_rate']:.0%} | {after['eos_rate']:.0%} | "
                 f"{after['eos_rate'] - before['eos_rate']:+.0%} |")
    lines.append(f"| KL to the reference (nats) | {before['kl']:.3f} | {after['kl']:.3f} | |")
    return lines
