"""The human-feedback reward r_f(x, y) = (1/M) sum_{i in S(x)} f_i * sim(y, y_i)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from lm_gym.data.feedback import FeedbackExample, default_feedback, load_feedback
from lm_gym.rewards.base import Reward
from lm_gym.rewards.encoders import LMEncoder, SentenceEncoder, cached_embeddings


class FeedbackReward(Reward):
    """Reward a response by its similarity to rated responses given to similar prompts.

    r_f(x, y) = (1/M) Σ_{i ∈ S(x)} f_i · sim(y, y_i), where S(x) holds the feedback items whose prompt
    is most similar to x: the ``top_m`` nearest by cosine similarity of prompt embeddings, keeping those at
    or above ``context_threshold``, and M = |S(x)|. When no feedback prompt is similar enough (S(x) empty)
    the reward is 0.0. Embeddings of the feedback set are computed once (and cached on disk); scoring a
    batch is a few matrix products on the encoder's device.

    :param feedback: a list of :class:`lm_gym.data.FeedbackExample`, a file for :func:`load_feedback`, or
        ``"default"`` (the shipped set of 360 rated responses to the default prompts).
    :param encoder: ``"default"`` (all-MiniLM-L6-v2), ``"lm"`` (mean-pooled hidden states of the env's LM,
        bound when the env is built), or any object with ``encode(texts) -> (N, D) tensor`` and ``cache_key``.
    :param top_m: largest number of feedback items per prompt (M ≤ top_m).
    :param context_threshold: least cosine similarity between prompts for an item to count.
    :param similarity: ``"cosine"``, ``"l2"`` (negative Euclidean distance) or a callable
        ``(responses (B, D), items (B, M, D)) -> (B, M)`` comparing response embeddings.
    :param index: ``"exact"`` (matrix product over all items) or ``"faiss"`` (FAISS inner-product index for
        millions of items; ``pip install lm-gym[faiss]``).
    :param cache: keep embeddings of the feedback set on disk under the lm-gym cache.
    """

    name = "feedback"

    def __init__(
        self,
        feedback: Sequence[FeedbackExample] | str | os.PathLike = "default",
        encoder="default",
        top_m: int = 8,
        context_threshold: float = 0.2,
        similarity: str | Callable = "cosine",
        index: str = "exact",
        cache: bool = True,
    ):
        if feedback == "default":
            feedback = default_feedback()
        elif isinstance(feedback, (str, os.PathLike)):
            feedback = load_feedback(feedback)
        self.feedback = list(feedback)
        if not self.feedback:
            raise ValueError("FeedbackReward needs at least one feedback example")
        self._configure(encoder, top_m, context_threshold, similarity, index, cache)

    @classmethod
    def from_store(cls, url: str, **settings) -> "FeedbackReward":
        """A FeedbackReward over a live feedback store (``lm-gym feedback serve``) that takes in new ratings
        as they arrive: see :class:`lm_gym.feedback.live.StoreFeedbackReward` (needs ``lm-gym[feedback]``).

        :param url: the store's SQLAlchemy URL.
        :param settings: keywords of :class:`~lm_gym.feedback.live.StoreFeedbackReward`.
        """
        from lm_gym.feedback.live import StoreFeedbackReward

        return StoreFeedbackReward(url, **settings)

    def _configure(self, encoder, top_m, context_threshold, similarity, index, cache) -> None:
        """Check and keep the scoring settings (the live-store subclass shares them)."""
        if top_m < 1 or not -1.0 <= context_threshold <= 1.0:
            raise ValueError(f"top_m must be >= 1 and context_threshold in [-1, 1], got {top_m}, {context_threshold}")
        if not (callable(similarity) or similarity in ("cosine", "l2")):
            raise ValueError(f"similarity={similarity!r}; expected 'cosine', 'l2' or a callable")
        if index not in ("exact", "faiss"):
            raise ValueError(f"index={index!r}; expected 'exact' or 'faiss'")
        self.top_m, self.context_threshold, self.similarity = top_m, context_threshold, similarity
        self.index_kind, self.cache = index, cache
        self.encoder = SentenceEncoder() if encoder == "default" else None if encoder == "lm" else encoder
        self._tables = None

    def bind(self, reference) -> None:
        """With ``encoder="lm"``, embed with the env's reference LM."""
        if self.encoder is None:
            self.encoder = LMEncoder(reference.model, reference.tokenizer)

    def _prepare(self):
        """Embed the feedback set once (each distinct text once): prompts (normalised), responses, values."""
        if self._tables is None:
            if self.encoder is None:
                raise RuntimeError("FeedbackReward(encoder='lm') must be bound to an LM (the env does this)")
            prompt_emb, item_prompt = self._embed_distinct([item.prompt for item in self.feedback])
            response_emb, item_response = self._embed_distinct([item.response for item in self.feedback])
            prompt_emb = _normalise(prompt_emb)
            values = torch.tensor([item.feedback for item in self.feedback], device=prompt_emb.device)
            index = self._build_index(prompt_emb, item_prompt)
            self._tables = (prompt_emb, item_prompt, response_emb[item_response], values, index)
        return self._tables

    def _embed_distinct(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the distinct texts, and each text's row among them."""
        distinct = sorted(set(texts))
        row = {text: i for i, text in enumerate(distinct)}
        embeddings = cached_embeddings(self.encoder, distinct, self.cache)
        return embeddings, torch.tensor([row[text] for text in texts], device=embeddings.device)

    def _build_index(self, prompt_emb: torch.Tensor, item_prompt: torch.Tensor):
        if self.index_kind == "exact":
            return None
        try:
            import faiss
        except ImportError as err:
            raise ImportError("index='faiss' needs the faiss package: pip install lm-gym[faiss]") from err
        index = faiss.IndexFlatIP(prompt_emb.shape[1])
        index.add(prompt_emb[item_prompt].cpu().numpy())
        return index

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        prompt_emb, item_prompt, response_emb, values, index = self._prepare()
        queries = _normalise(self.encoder.encode(list(prompts)))
        answers = self.encoder.encode(list(responses))
        context_sim, items = self._nearest_items(queries, prompt_emb, item_prompt, index)
        selected = context_sim >= self.context_threshold
        response_sim = self._response_similarity(answers, response_emb[items])
        weighted = torch.where(selected, values[items] * response_sim, torch.zeros_like(response_sim))
        count = selected.sum(dim=1)
        return torch.where(count > 0, weighted.sum(dim=1) / count.clamp(min=1), torch.zeros_like(count, dtype=weighted.dtype))

    def _nearest_items(self, queries, prompt_emb, item_prompt, index) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_m`` feedback items per query by prompt cosine similarity: (similarities, item ids)."""
        k = min(self.top_m, len(item_prompt))
        if index is not None:
            sims, items = index.search(queries.cpu().numpy(), k)
            return torch.as_tensor(sims, device=queries.device), torch.as_tensor(items, device=queries.device)
        item_sims = (queries @ prompt_emb.T)[:, item_prompt]  # (B, items): each item's prompt similarity
        return item_sims.topk(k, dim=1)

    def _response_similarity(self, answers: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        if callable(self.similarity):
            return torch.as_tensor(self.similarity(answers, neighbours), dtype=answers.dtype, device=answers.device)
        if self.similarity == "cosine":
            return torch.einsum("bd,bmd->bm", _normalise(answers), _normalise(neighbours))
        return -(answers[:, None, :] - neighbours).norm(dim=-1)


def _normalise(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)
