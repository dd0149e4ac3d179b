"""Model rewards r_m: a trained reward model, the LM as its own judge, and fluency under the reference LM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lm_gym.chat import encode_prompt, format_exchange, has_chat_template
from lm_gym.models import ensure_pad_token, resolve_device
from lm_gym.rewards.base import Reward
from lm_gym.padding import SHAPE_MULTIPLE, pad_left
from lm_gym.precision import resolve_precision
from lm_gym.reference import ReferenceModel

REWARD_STATS_FILE = "reward_stats.json"


class RewardModelReward(Reward):
    """Score chat-formatted (prompt, response) pairs with a sequence-classification reward model.

    :param model: a directory (``AutoModelForSequenceClassification`` with one label) or a loaded model.
    :param tokenizer: needed with a loaded model; loaded from the directory otherwise.
    :param normalize: subtract the reward mean and divide by the std stored beside the model
        (``reward_stats.json``, written by ``agents.train_reward_model``).
    :param batch_size: responses scored per forward.
    :param max_length: longest formatted exchange in tokens; longer ones keep their last tokens.
    :param device: where to run it; default CUDA when available.
    :param stats: ``{"mean", "std"}`` of the rewards, with a loaded model (a directory brings its own).
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (:func:`lm_gym.precision.resolve_precision`; default
        ``$LM_GYM_PRECISION``, else ``"auto"``): bf16 runs the forwards under autocast over the model's own
        weights, which stay as given; the scores are float32 either way.
    """

    name = "reward_model"

    def __init__(self, model, tokenizer=None, normalize: bool = False, batch_size: int = 16,
                 max_length: int = 512, device=None, stats: dict | None = None, precision=None):
        self.stats = stats
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer, stored = load_reward_model_dir(model, tokenizer)
            self.stats = stored or stats
        if tokenizer is None:
            raise ValueError("RewardModelReward with a loaded model needs tokenizer=")
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output label, this one has {model.config.num_labels}")
        if normalize and self.stats is None:
            raise ValueError(f"normalize=True needs {REWARD_STATS_FILE} beside the reward model (its mean and std)")
        ensure_pad_token(tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        device = resolve_device(device)
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.normalize, self.batch_size, self.max_length = normalize, batch_size, max_length
        self.precision = resolve_precision(precision, device)

    @torch.no_grad()
    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        with self.precision.autocast(self.model.device):
            scores = score_exchanges(self.model, self.tokenizer, prompts, responses, self.max_length, self.batch_size)
        if self.normalize:
            scores = (scores - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return scores


def load_reward_model_dir(directory: str | os.PathLike, tokenizer=None) -> tuple:
    """``(model, tokenizer, stats)`` of a reward-model directory: the one-label classifier (pad token set),
    its tokenizer (unless given) and the ``{"mean", "std", ...}`` of ``reward_stats.json`` (None without it)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"reward model directory {directory} has no config.json")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
    ensure_pad_token(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    model.config.pad_token_id = tokenizer.pad_token_id
    stats_file = directory / REWARD_STATS_FILE
    return model, tokenizer, json.loads(stats_file.read_text()) if stats_file.is_file() else None


def score_exchanges(model, tokenizer, prompts, responses, max_length: int, batch_size: int) -> torch.Tensor:
    """(B,) float32 rewards of (prompt, response) pairs, chat-formatted and scored ``batch_size`` at a time,
    in order of length (batches of similar lengths carry little padding); no gradients."""
    ids = exchange_ids(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(ids)), key=lambda row: len(ids[row]))
    scores = torch.empty(len(ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        with torch.no_grad():
            scores[rows] = sequence_scores(model, [ids[row] for row in rows], tokenizer.pad_token_id).float().cpu()
    return scores


def exchange_ids(tokenizer, prompts, responses, max_length: int) -> list[list[int]]:
    """Each (prompt, response) chat-formatted as the env formats it, tokenized; longer than ``max_length``
    tokens, an exchange keeps its last ``max_length`` (the response's end and the prompt's latest turns)."""
    texts = [format_exchange(tokenizer, p, r) for p, r in zip(prompts, responses)]
    return [tokenizer(text, add_special_tokens=False).input_ids[-max_length:] for text in texts]


def sequence_scores(model, ids: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """(B,) scalar outputs of a one-label sequence classifier on left-padded sequences (with gradients if enabled)."""
    batch, mask = pad_left(ids, pad_token_id, model.device, SHAPE_MULTIPLE)
    return model(input_ids=batch, attention_mask=mask).logits[:, 0]


class LMJudgeReward(Reward):
    """The env's own LM as judge: log-probability of a "yes" verdict under a judging prompt.

    Uses the LM the env already holds (bound when the env is built), not a second copy.

    :param judge_prompt: a template with ``{prompt}`` and ``{response}``; sent as one user message
        (chat template) followed by the assistant's turn, whose first token is the verdict.
    :param yes: the verdict word whose first token is scored.
    :param no: if given, score log p(yes) - log p(no) instead of log p(yes).
    """

    name = "judge"
    DEFAULT_PROMPT = (
        "Here is a question and an answer.\n\nQuestion: {prompt}\n\nAnswer: {response}\n\n"
        "Is the answer helpful, correct and polite? Reply with Yes or No."
    )

    def __init__(self, judge_prompt: str = DEFAULT_PROMPT, yes: str = "Yes", no: str | None = None,
                 model=None, tokenizer=None):
        if "{prompt}" not in judge_prompt or "{response}" not in judge_prompt:
            raise ValueError("judge_prompt must contain {prompt} and {response}")
        self.judge_prompt, self.yes, self.no = judge_prompt, yes, no
        self.judge = None if model is None else ReferenceModel(model, tokenizer)

    def bind(self, reference: ReferenceModel) -> None:
        """Judge with the env's reference LM unless a model was given."""
        if self.judge is None:
            self.judge = reference

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        if self.judge is None:
            raise RuntimeError("LMJudgeReward needs an LM: pass model= and tokenizer=, or use it inside an env")
        tokenizer = self.judge.tokenizer
        chat = has_chat_template(tokenizer)
        contexts = [
            encode_prompt(tokenizer, self.judge_prompt.format(prompt=p, response=r), chat)
            for p, r in zip(prompts, responses)
        ]
        logprobs = self.judge.next_token_logprobs(contexts)
        score = logprobs[:, self._first_token(self.yes)]
        if self.no is not None:
            score = score - logprobs[:, self._first_token(self.no)]
        return score

    def _first_token(self, word: str) -> int:
        return self.judge.tokenizer(word, add_special_tokens=False).input_ids[0]


class FluencyReward(Reward):
    """Mean per-token log-likelihood of the response under the reference LM (≤ 0; higher is more fluent).

    Inside the env it reads ``context["ref_logprobs"]`` (the env's reference scored every token as it was
    taken), so it costs no forward. Without them (an env made with ``reference_logprobs=False``) it scores the
    env's exact tokens (``context_ids`` and ``response_ids``) with the env's reference in one batched forward;
    outside an env it encodes the prompt and response texts.

    :param model: the reference LM to score with outside an env (inside one, the env's reference is bound).
    :param tokenizer: its tokenizer.
    """

    name = "fluency"

    def __init__(self, model=None, tokenizer=None):
        self.reference = None if model is None else ReferenceModel(model, tokenizer)

    def bind(self, reference: ReferenceModel) -> None:
        """Score with the env's reference unless a model was given."""
        if self.reference is None:
            self.reference = reference

    def __call__(self, prompts, responses, ref_logprobs=None, context_ids=None, response_ids=None,
                 **context) -> torch.Tensor:
        if ref_logprobs is None:
            ref_logprobs = self._score(prompts, responses, context_ids, response_ids)
        return torch.stack([lp.float().mean() if len(lp) else torch.tensor(0.0) for lp in ref_logprobs]).cpu()

    def _score(self, prompts, responses, context_ids, response_ids) -> list[torch.Tensor]:
        """Reference log-probs of the response tokens: the env's exact tokens when given, else the encoded text."""
        if self.reference is None:
            raise ValueError("FluencyReward needs context['ref_logprobs'] or an LM (model=, tokenizer=)")
        if context_ids is not None and response_ids is not None:
            prefixes, continuations = context_ids, response_ids
        else:
            tokenizer = self.reference.tokenizer
            prefixes = [encode_prompt(tokenizer, p, has_chat_template(tokenizer)) for p in prompts]
            continuations = [tokenizer(r, add_special_tokens=False).input_ids for r in responses]
        return self.reference.continuation_logprobs(prefixes, continuations)
