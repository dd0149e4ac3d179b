"""Reward models from human preferences: a scalar head on a causal-LM backbone, Bradley-Terry training.

``train_reward_model(pairs)`` turns preference pairs into a :class:`RewardModel`: a one-label
``AutoModelForSequenceClassification`` built on the LM's own weights (any Hugging Face causal LM whose
architecture has a sequence-classification class), trained with -log σ(r_chosen - r_rejected - margin)
plus an optional centring term. Prompts and responses are chat-formatted exactly as the env formats them
(HH-RLHF transcript prompts become chat messages), so the reward model scores what the policy writes.
``RewardModel.save`` writes a standard directory that :class:`lm_gym.rewards.RewardModelReward` loads,
with the reward mean and std for normalisation.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lm_gym.data import PreferencePair, chat_prompt
from lm_gym.models import resolve_model
from lm_gym.precision import Precision, resolve_precision
from lm_gym.rewards import RewardModelReward
from lm_gym.rewards.model_rewards import (
    REWARD_STATS_FILE, exchange_ids, load_reward_model_dir, score_exchanges, sequence_scores,
)


@dataclass
class RewardModel:
    """A trained reward model: the sequence classifier, its tokenizer and the statistics of its rewards."""

    model: torch.nn.Module
    tokenizer: object
    mean: float = 0.0
    std: float = 1.0
    max_length: int = 512
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    evaluation: dict | None = None  # evaluate_reward_model on the held-out pairs, when given
    precision: Precision | str | None = None  # the forwards' (see lm_gym.precision); rewards are float32

    @torch.no_grad()
    def score(self, prompts, responses, batch_size: int = 16) -> torch.Tensor:
        """Raw rewards (B,) float32 of chat-formatted (prompt, response) pairs, the forwards in :attr:`precision`."""
        self.model.eval()
        prompts = [chat_prompt(p) for p in prompts]
        with resolve_precision(self.precision, self.model.device).autocast(self.model.device):
            return score_exchanges(self.model, self.tokenizer, prompts, responses, self.max_length, batch_size).cpu()

    def save(self, directory: str | Path) -> Path:
        """Write a standard ``AutoModelForSequenceClassification`` directory plus ``reward_stats.json``."""
        directory = Path(directory)
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        stats = {"mean": self.mean, "std": self.std, "max_length": self.max_length}
        (directory / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device=None, precision=None) -> "RewardModel":
        """Read a directory written by :meth:`save` (float32 weights; ``precision`` for its forwards)."""
        model, tokenizer, stats = load_reward_model_dir(directory)
        if stats is None:
            raise FileNotFoundError(f"{directory} has no {REWARD_STATS_FILE} (the reward mean and std); "
                                    "is it a directory written by RewardModel.save?")
        model = model.to(device or "cpu").eval()
        return cls(model, tokenizer, stats["mean"], stats["std"], stats.get("max_length", 512), precision=precision)

    def as_reward(self, normalize: bool = True) -> RewardModelReward:
        """This model as an env reward (standardised with its stored statistics by default)."""
        return RewardModelReward(self.model, self.tokenizer, normalize=normalize, max_length=self.max_length,
                                 device=self.model.device, stats={"mean": self.mean, "std": self.std},
                                 precision=self.precision)


def reward_model_from_lm(base="default", tokenizer=None, device=None, seed: int = 0):
    """A one-label sequence classifier carrying the weights of the causal LM ``base``; the head is new.

    :return: ``(model, tokenizer)``.
    """
    lm, tokenizer = resolve_model(base, tokenizer, device, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = _with_backbone_of(lm, AutoModelForSequenceClassification, num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id)
        except ValueError as err:
            raise ValueError(f"{type(lm).__name__} has no sequence-classification class for a reward head") from err
    model.config.name_or_path = getattr(lm, "name_or_path", "")
    return model.to(lm.device), tokenizer


def critic_from_reward_model(reward_model, device=None):
    """A critic initialised from a reward model: ``(causal LM backbone, head weight, head bias)``.

    The backbone is a causal LM carrying the reward model's transformer weights; the linear head is the
    reward head rescaled to standardised rewards, (w·h - mean) / std, the scale LMPPO's normalised rewards have.

    :param reward_model: a :class:`RewardModel` or a directory written by :meth:`RewardModel.save`.
    """
    rm = reward_model if isinstance(reward_model, RewardModel) else RewardModel.load(reward_model, device)
    classifier = rm.model.merge_and_unload() if hasattr(rm.model, "merge_and_unload") else rm.model
    lm = _with_backbone_of(classifier, AutoModelForCausalLM)
    lm.tie_weights()
    head = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1]
    std = max(rm.std, 1e-8)
    bias = (head.bias.detach() if head.bias is not None else torch.zeros(1)) - rm.mean
    return lm.to(device or classifier.device).eval(), head.weight.detach() / std, bias / std


def critic_start(value_model, device=None) -> tuple[object, tuple | None]:
    """``(value_model, value_init)`` for :meth:`agents.TransformerActorCritic.from_pretrained` from a
    ``value_model`` setting: a reward model (a :class:`RewardModel` or a directory written by
    :meth:`RewardModel.save`) becomes its transformer as a causal LM and its head rescaled to standardised
    rewards (:func:`critic_from_reward_model`); anything else (None, an LM name, path or model) passes through."""
    if isinstance(value_model, RewardModel) or (
        isinstance(value_model, (str, os.PathLike)) and (Path(value_model) / REWARD_STATS_FILE).is_file()
    ):
        backbone, weight, bias = critic_from_reward_model(value_model, device)
        return backbone, (weight, bias)
    return value_model, None


def _with_backbone_of(source, auto_class, **config_changes):
    """A new ``auto_class`` model of ``source``'s architecture (config copied, ``config_changes`` applied)
    carrying ``source``'s transformer weights; its head is freshly initialised."""
    config = source.config.__class__.from_dict(source.config.to_dict())
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = auto_class.from_config(config)
    getattr(model, model.base_model_prefix).load_state_dict(getattr(source, source.base_model_prefix).state_dict())
    return model


def train_reward_model(
    pairs: Sequence[PreferencePair], base="default", *, tokenizer=None, lora=None, max_length: int = 512,
    epochs: int = 1, lr: float = 1e-5, batch_size: int = 8, margin=None, center_coef: float = 0.0,
    train_layers: int | None = None, eval_pairs: Sequence[PreferencePair] | None = None, seed: int = 0,
    device=None, precision=None, progress: bool = True,
) -> RewardModel:
    """Train a reward model on preference pairs with the Bradley-Terry loss.

    :param pairs: ``PreferencePair(prompt, chosen, rejected)`` (``lm_gym.data.load_preferences``).
    :param base: the backbone: ``"default"``, ``"tiny"``, a directory, a hub id, or a loaded causal LM.
    :param tokenizer: with a loaded ``base`` whose tokenizer cannot be loaded from its ``name_or_path``.
    :param lora: None (train the weights) or LoRA settings (peft ``LoraConfig`` fields); merged on save.
    :param max_length: tokens per formatted exchange; longer ones keep their last tokens (counted, warned).
    :param margin: None, one margin for every pair, or one per pair: loss -log σ(r_c - r_r - margin).
    :param center_coef: weight of mean((r_c + r_r)²), which keeps rewards centred on 0.
    :param train_layers: train only the top N transformer blocks (plus final norm and head); None: all.
    :param eval_pairs: held-out pairs; the result's ``evaluation`` holds :func:`evaluate_reward_model`'s.
    :param device: where to train; default CUDA when available. ``progress``: show a progress bar.
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (see :mod:`lm_gym.precision`): bf16 runs the forwards
        under autocast on float32 weights and optimizer states; scores and the loss are float32. Default
        ``$LM_GYM_PRECISION``, else ``"auto"``.
    :return: the :class:`RewardModel`, with the mean and std of its rewards on the last epoch's responses.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no preference pairs to train on")
    margins = _margins(margin, len(pairs))
    model, tokenizer = reward_model_from_lm(base, tokenizer, device, seed)
    precision = resolve_precision(precision, model.device)
    model = _trainable(model, lora, train_layers).eval()  # eval(): dropout off; gradients still flow
    chosen, rejected = _encode(tokenizer, pairs, max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history, last_scores = [], []
    steps = epochs * math.ceil(len(pairs) / batch_size)
    bar = tqdm(total=steps, desc="reward model", disable=not progress)
    lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]
    for epoch in range(epochs):
        for rows in length_grouped_batches(lengths, batch_size, generator):
            record, scores = _step(model, optimizer, tokenizer, chosen, rejected, rows, margins, center_coef, precision)
            history.append({"epoch": epoch, **record})
            if epoch == epochs - 1:
                last_scores.append(scores)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
    bar.close()
    scores = torch.cat(last_scores)
    result = RewardModel(model, tokenizer, float(scores.mean()), float(scores.std()), max_length, history,
                         precision=precision)
    if eval_pairs is not None:
        result.evaluation = evaluate_reward_model(result, eval_pairs)
    return result


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of indices with similar lengths (little padding): a random order is cut into windows
    of 16 batches, each window sorted by length and cut into batches, and the batches are shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _margins(margin, count: int) -> torch.Tensor:
    if margin is None:
        return torch.zeros(count)
    if isinstance(margin, (int, float)):
        return torch.full((count,), float(margin))
    margins = torch.as_tensor(list(margin), dtype=torch.float32)
    if margins.shape != (count,):
        raise ValueError(f"margin has {margins.numel()} values for {count} pairs; give one per pair or one for all")
    return margins


def _trainable(model, lora, train_layers: int | None):
    if lora:
        from peft import LoraConfig, get_peft_model

        config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="SEQ_CLS", **dict(lora))
        return get_peft_model(model, config)
    model.requires_grad_(True)
    if train_layers is not None:
        backbone = getattr(model, model.base_model_prefix)
        blocks = max((m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
        if not 0 < train_layers <= len(blocks):
            raise ValueError(f"train_layers={train_layers}: the model has {len(blocks)} blocks")
        frozen = {id(p) for block in blocks[: len(blocks) - train_layers] for p in block.parameters()}
        frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
    return model


def _encode(tokenizer, pairs: list[PreferencePair], max_length: int) -> tuple[list, list]:
    prompts = [chat_prompt(pair.prompt) for pair in pairs]
    full = exchange_ids(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], 10**9)
    cut = sum(len(ids) > max_length for ids in full)
    if cut:
        warnings.warn(f"{cut} of {len(full)} formatted exchanges are longer than max_length={max_length} tokens; "
                      "they keep their last tokens (raise max_length to keep everything)", stacklevel=3)
    full = [ids[-max_length:] for ids in full]
    return full[: len(pairs)], full[len(pairs) :]


def _step(model, optimizer, tokenizer, chosen, rejected, rows, margins, center_coef, precision: Precision
          ) -> tuple[dict, torch.Tensor]:
    """One optimizer step on the pairs ``rows``: chosen and rejected responses in one forward (in ``precision``)."""
    with precision.autocast(model.device):
        scores = sequence_scores(model, [chosen[r] for r in rows] + [rejected[r] for r in rows],
                                 tokenizer.pad_token_id).float()
    r_chosen, r_rejected = scores[: len(rows)], scores[len(rows) :]
    difference = r_chosen - r_rejected
    loss = -torch.nn.functional.logsigmoid(difference - margins[rows].to(difference.device)).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scores = scores.detach().cpu()
    record = {"loss": loss.item(), "accuracy": float((difference > 0).float().mean()),
              "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
              "margin": float(difference.detach().mean())}
    return record, scores


def evaluate_reward_model(rm: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 16) -> dict:
    """Pairwise accuracy (chosen scored above rejected) with a 95% Wilson interval, and the margins.

    :return: ``{"accuracy", "ci95": (low, high), "pairs", "ties", "margins": [r_c - r_r, ...],
        "margin_mean", "margin_quantiles": {5, 25, 50, 75, 95}}``.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no preference pairs to evaluate on")
    prompts = [pair.prompt for pair in pairs]
    margins = (rm.score(prompts, [p.chosen for p in pairs], batch_size)
               - rm.score(prompts, [p.rejected for p in pairs], batch_size)).numpy()
    n, wins = len(margins), int((margins > 0).sum())
    return {
        "accuracy": wins / n, "ci95": wilson_interval(wins, n), "pairs": n, "ties": int((margins == 0).sum()),
        "margins": margins.tolist(), "margin_mean": float(margins.mean()),
        "margin_quantiles": {q: float(np.percentile(margins, q)) for q in (5, 25, 50, 75, 95)},
    }


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    p = successes / trials
    centre = (p + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / (1 + z**2 / trials)
    return centre - half, centre + half
