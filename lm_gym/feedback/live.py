"""A ``FeedbackReward`` that reads a live feedback store and takes in ratings as people give them."""

from __future__ import annotations

import time

import torch

from lm_gym.data.feedback import FeedbackExample
from lm_gym.feedback.export import SIGNAL_VALUES, prompt_for_export
from lm_gym.feedback.schema import Item
from lm_gym.feedback.store import FeedbackStore
from lm_gym.rewards.feedback import FeedbackReward, _normalise

Row = tuple[int, str]  # (item id, "a" or "b"): one rated response


class StoreFeedbackReward(FeedbackReward):
    """r_f(x, y) of :class:`FeedbackReward` over the rated responses of a feedback store, kept up to date.

    Each rated response is one feedback item: f_i is the mean of its votes (+1/-1 ratings, like/dislike
    signals); a compared pair gives both its responses, the preferred one the vote and the other its
    negative (a tie 0), as :func:`lm_gym.data.pairs_to_feedback` does. :meth:`refresh` reads only what was
    stored since the last refresh, embeds only prompts and responses it has not seen, and updates the
    values of responses that received more votes. Scoring never reads the store: the index stays as the
    last refresh left it, so every reward call of a rollout sees the same ratings (the first call refreshes
    once if nothing has yet). ``lm-gym train`` refreshes at the start of each rollout
    (:class:`agents.callbacks.RefreshRewardCallback`, through :meth:`lm_gym.rewards.Reward.refresh`); other
    training loops call :meth:`refresh` between their rollouts. While nothing is rated the reward is 0.

    :param url: the store's SQLAlchemy URL.
    :param encoder: as for :class:`FeedbackReward` (``"default"``, ``"lm"`` or an encoder object).
    :param top_m: as for :class:`FeedbackReward`.
    :param context_threshold: as for :class:`FeedbackReward`.
    :param similarity: as for :class:`FeedbackReward`.
    """

    def __init__(self, url: str, encoder="default", top_m: int = 8, context_threshold: float = 0.2,
                 similarity="cosine"):
        self._configure(encoder, top_m, context_threshold, similarity, "exact", cache=False)
        self.store = FeedbackStore(url)
        self._rows: dict[Row, int] = {}
        self._texts: list[tuple[str, str]] = []  # (prompt, response) per row
        self._votes: list[list[float]] = []
        self._prompt_rows: dict[str, int] = {}
        self._last_rating = self._last_signal = 0
        self.refreshed = False
        self.refreshes: list[dict] = []  # one entry per refresh that found new votes

    def refresh(self) -> int:
        """Take in the votes stored since the last refresh; return how many responses were added or changed.
        Call it between rollouts: scoring uses the index as this leaves it."""
        if self.encoder is None:
            raise RuntimeError("StoreFeedbackReward(encoder='lm') must be bound to an LM (the env does this)")
        self.refreshed = True
        votes = self._new_votes()
        if not votes:
            return 0
        new_rows, changed = [], set()
        for key, value, item in votes:
            if key not in self._rows:
                self._rows[key] = len(self._texts)
                self._texts.append((prompt_for_export(item.prompt), item.response_a if key[1] == "a" else item.response_b))
                self._votes.append([])
                new_rows.append(self._rows[key])
            self._votes[self._rows[key]].append(value)
            changed.add(self._rows[key])
        self._extend_tables(new_rows)
        self.refreshes.append({"at": time.time(), "responses": len(self._texts), "new": len(new_rows),
                               "changed": len(changed)})
        return len(changed)

    def _new_votes(self) -> list[tuple[Row, float, Item]]:
        stored_ratings = self.store.ratings(after_id=self._last_rating)
        stored_signals = self.store.signals(after_id=self._last_signal)
        self._last_rating = max([self._last_rating] + [r.id for r in stored_ratings])
        self._last_signal = max([self._last_signal] + [s.id for s in stored_signals])
        ratings = [r for r in stored_ratings if r.value is not None]  # skips carry no vote
        signals = [s for s in stored_signals if s.signal in SIGNAL_VALUES]  # nor do clicks
        items = {item.id: item for item in self.store.items({r.item_id for r in ratings} | {s.item_id for s in signals})}
        votes = []
        for rating in ratings:
            item = items[rating.item_id]
            votes.append(((item.id, "a"), rating.value, item))
            if item.kind == "pair":
                votes.append(((item.id, "b"), -rating.value, item))
        votes += [((s.item_id, "a"), SIGNAL_VALUES[s.signal], items[s.item_id]) for s in signals]
        return votes

    def _extend_tables(self, new_rows: list[int]) -> None:
        """Embed the new rows' responses and unseen prompts; rebuild the value vector (one float per row)."""
        new_prompts = sorted({self._texts[row][0] for row in new_rows} - set(self._prompt_rows))
        responses = self.encoder.encode([self._texts[row][1] for row in new_rows]) if new_rows else None
        prompts = _normalise(self.encoder.encode(new_prompts)) if new_prompts else None
        for prompt in new_prompts:
            self._prompt_rows[prompt] = len(self._prompt_rows)
        if self._tables is None:
            prompt_emb, response_emb = prompts, responses
        else:
            old_prompts, _, old_responses, _, _ = self._tables
            prompt_emb = old_prompts if prompts is None else torch.cat([old_prompts, prompts])
            response_emb = old_responses if responses is None else torch.cat([old_responses, responses])
        device = prompt_emb.device
        item_prompt = torch.tensor([self._prompt_rows[prompt] for prompt, _ in self._texts], device=device)
        values = torch.tensor([sum(v) / len(v) for v in self._votes], device=device)
        self._tables = (prompt_emb, item_prompt, response_emb, values, None)

    def _prepare(self):
        return self._tables

    def examples(self) -> list[FeedbackExample]:
        """The rated responses as they stand: (prompt, response, mean vote)."""
        return [FeedbackExample(p, r, sum(v) / len(v)) for (p, r), v in zip(self._texts, self._votes)]

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        if not self.refreshed:
            self.refresh()
        if self._tables is None:
            return torch.zeros(len(responses))
        return super().__call__(prompts, responses, **context)
