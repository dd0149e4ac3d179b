"""``lm-gym rlhf``: from preference pairs to a tuned model, with the env and LMPPO in the middle.

Stages, each writing into one run directory and each skippable by pointing at an existing artefact:

1. optional SFT on the chosen responses (``sft/``; skipped with ``--policy DIR``);
2. reward-model training on the pairs (``reward_model/``; skipped with ``--reward-model DIR``);
3. LMPPO on ``LanguageModelEnv`` over the pairs' prompts with
   ``BlendedReward(FeedbackReward(pairs_to_feedback(pairs)), RewardModelReward(rm), alpha)``, then export
   (``model/``, with everything ``lm-gym train`` writes);
4. ``report.md``: reward-model accuracy, its training curve, reward and KL curves, held-out reward before
   and after, samples.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from agents.export import export_pretrained
from agents.reward_model import RewardModel, evaluate_reward_model, train_reward_model
from agents.sft import sft
from agents.train import TrainConfig, TrainingData, timed_run
from lm_gym.data import FeedbackExample, chat_prompt, load_preferences, pairs_to_feedback, prompt_text
from lm_gym.rewards import BlendedReward, FeedbackReward

PRESETS = {
    "smoke": dict(model="tiny", max_pairs=48, eval_pairs=8, rm_epochs=1, rm_max_length=256, sft_epochs=1,
                  iterations=2, num_envs=4, max_new_tokens=8, batch_size=64, eval_prompts=4, eval_samples=1,
                  critic_warmup=0),
}


@dataclass
class RLHFConfig(TrainConfig):
    """``lm-gym train``'s settings (for the PPO stage) plus the RLHF pipeline's."""

    preferences: str | None = None
    sft: bool = False
    policy: str | None = None
    reward_model: str | None = None
    max_pairs: int | None = None
    eval_pairs: int = 100
    rm_epochs: int = 1
    rm_lr: float = 1e-5
    rm_batch_size: int = 8
    rm_max_length: int = 384
    rm_train_layers: int | None = None
    sft_epochs: int = 1
    sft_lr: float = 1e-5

    HELP: ClassVar[dict[str, str]] = {
        **TrainConfig.HELP,
        "preferences": "preference pairs to learn from (required): JSONL/CSV of prompt, chosen, rejected, or "
                       "HH-RLHF transcripts",
        "sft": "fine-tune the policy on the chosen responses before PPO",
        "policy": "start PPO from this model instead of model (or the SFT result)",
        "reward_model": "use this trained reward-model directory instead of training one",
        "max_pairs": "use at most this many preference pairs (default: all)",
        "eval_pairs": "pairs held out to measure the reward model's accuracy",
        "rm_epochs": "reward-model training epochs",
        "rm_lr": "reward-model learning rate",
        "rm_batch_size": "preference pairs per reward-model step",
        "rm_max_length": "longest exchange in tokens the reward model reads (longer ones keep their end)",
        "rm_train_layers": "train only the top this-many transformer layers of the reward model (default: all)",
        "sft_epochs": "SFT epochs",
        "sft_lr": "SFT learning rate",
    }

    @classmethod
    def preset(cls, name: str | None, **overrides) -> "RLHFConfig":
        """The named preset (``"smoke"``: the tiny model, minutes on a CPU) with ``overrides`` on top."""
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}})


def run_rlhf(config: RLHFConfig, run_dir: Path) -> dict:
    """Run every stage into ``run_dir``; return the summary that ``report.md`` shows."""
    if not config.preferences:
        raise ValueError("lm-gym rlhf needs --preferences FILE (JSONL/CSV of prompt/chosen/rejected or HH transcripts)")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, precision=config.resolved()[1].name)  # one precision for every stage
    train_pairs, held_out = split_pairs(config)
    summary: dict = {"pairs": len(train_pairs), "held_out_pairs": len(held_out)}
    policy = config.policy or config.model
    if config.sft and not config.policy:
        model, tokenizer, summary["sft_history"] = sft(config.model, train_pairs, epochs=config.sft_epochs,
                                                       lr=config.sft_lr, seed=config.seed, device=config.device,
                                                       precision=config.precision)
        policy = str(export_pretrained(model, run_dir / "sft", tokenizer))
    rm = _reward_model(config, train_pairs, held_out, run_dir)
    summary["reward_model"] = {k: v for k, v in rm.evaluation.items() if k != "margins"}
    summary["reward_model_history"] = rm.history
    data = rlhf_training_data(config, train_pairs, held_out, rm)
    ppo = TrainConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)})
    summary["ppo"] = timed_run(dataclasses.replace(ppo, model=policy), run_dir, data=data)
    write_rlhf_report(run_dir, summary)
    return summary


def split_pairs(config: RLHFConfig) -> tuple[list, list]:
    """(training pairs, held-out pairs): the last ``eval_pairs`` of the first ``max_pairs`` are held out."""
    pairs = list(load_preferences(config.preferences))
    pairs = pairs[: config.max_pairs] if config.max_pairs else pairs
    if len(pairs) <= config.eval_pairs:
        raise ValueError(f"{config.preferences}: {len(pairs)} usable pairs, need more than eval_pairs={config.eval_pairs}")
    return pairs[: -config.eval_pairs], pairs[-config.eval_pairs :]


def _reward_model(config: RLHFConfig, train_pairs, held_out, run_dir: Path) -> RewardModel:
    if config.reward_model:
        rm = RewardModel.load(config.reward_model, precision=config.precision)
        rm.evaluation = evaluate_reward_model(rm, held_out)
        return rm
    rm = train_reward_model(
        train_pairs, config.model, max_length=config.rm_max_length, epochs=config.rm_epochs, lr=config.rm_lr,
        batch_size=config.rm_batch_size, train_layers=config.rm_train_layers, eval_pairs=held_out,
        seed=config.seed, device=config.device, precision=config.precision,
    )
    rm.save(run_dir / "reward_model")
    return rm


def rlhf_training_data(config: RLHFConfig, train_pairs, held_out, rm: RewardModel) -> TrainingData:
    """The pairs' prompts (as chat messages) and the blend r = α·r_f(pairs) + (1-α)·r_m(reward model)."""
    feedback = [FeedbackExample(prompt_text(chat_prompt(e.prompt)), e.response, e.feedback)
                for e in pairs_to_feedback(train_pairs)]
    train_prompts = _unique([chat_prompt(p.prompt) for p in train_pairs])
    eval_prompts = _unique([chat_prompt(p.prompt) for p in held_out])[: config.eval_prompts]
    return TrainingData(train_prompts, eval_prompts,
                        lambda: BlendedReward(FeedbackReward(feedback), rm.as_reward(), alpha=config.alpha))


def _unique(prompts: list) -> list:
    seen, unique = set(), []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(prompt)
    return unique


def write_rlhf_report(run_dir: Path, summary: dict) -> None:
    """``report.md`` and ``reward_model.png`` (its loss and accuracy per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary["reward_model_history"]
    lines = ["# RLHF run", "", f"{summary['pairs']} training pairs, {summary['held_out_pairs']} held out.", ""]
    if history:
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for axis, key in zip(axes, ("loss", "accuracy")):
            axis.plot([record[key] for record in history])
            axis.set_title(f"reward model: {key}")
            axis.set_xlabel("step")
        figure.tight_layout()
        figure.savefig(run_dir / "reward_model.png", dpi=100)
        plt.close(figure)
    evaluation = summary["reward_model"]
    low, high = evaluation["ci95"]
    lines += ["## Reward model", "", f"Held-out pairwise accuracy {evaluation['accuracy']:.3f} "
              f"(95% CI {low:.3f}-{high:.3f}, {evaluation['pairs']} pairs); mean margin {evaluation['margin_mean']:.3f}.",
              ""]
    lines += ["![reward model](reward_model.png)", ""] if history else []
    lines += ["## PPO", "", "![curves](curves.png)", ""]
    for label in ("before", "after"):
        record = summary["ppo"][label]
        lines.append(f"- {label}: held-out reward {record['reward']:.3f} ± {record['reward_stderr']:.3f}, "
                     f"KL {record['kl']:.3f}, length {record['length']:.0f} characters")
    lines += ["", "Samples before and after: [samples.md](samples.md). The tuned model: `model/`.", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
