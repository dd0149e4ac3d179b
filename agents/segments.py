"""Token episodes stored once: a segment is a context plus the tokens an agent took after it.

A rollout of n steps over N env rows yields segments: each starts where an episode (or the rollout)
started and ends at the episode's end or the rollout's end. Per token a segment keeps the policy's
log-prob, the value, the reference log-prob and the env's reward; nothing is stored per padded observation.
In multi-turn episodes the env puts tokens of its own between the agent's (a tool result, the other party's
turn): a segment keeps them where they came, as context of the tokens after them, never as actions.
A :class:`Rollout` is what a rollout leaves for the update: its segments, the allowed-token mask they were
sampled under and the time it took. :class:`SegmentBatch` pads the segments into tensors for one forward per
segment and computes its own returns and advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agents.advantages import gae, kl_shaped_rewards
from lm_gym.padding import pad_left, pad_right, trim_left


@dataclass
class Segment:
    """One piece of an episode: ``context`` token ids, then the agent's ``tokens`` with their statistics."""

    context: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ref_logprobs: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    scored: list[bool] = field(default_factory=list)  # the env scored a response at this token
    next_value: float = 0.0  # V(s') after the last token when truncated, 0 when terminated
    terminated: bool = False
    ended: bool = False  # the episode ended here (not just the rollout)
    reward_components: dict = field(default_factory=dict)
    group: int | None = None  # the env's prompt group of the episode (``info["group"]``), if it groups rows
    inserts: list[tuple[int, list[int]]] = field(default_factory=list)  # (agent tokens before, the env's ids)

    def sequence(self) -> list[int]:
        """The segment's token ids in order: the context, then the agent's tokens with the inserted ones."""
        ids, start = list(self.context), 0
        for after, inserted in self.inserts:
            ids += self.tokens[start:after] + inserted
            start = after
        return ids + self.tokens[start:]

    def offsets(self) -> list[int]:
        """Where each of the agent's tokens lies among the ids after the context."""
        offsets, shift, pending = [], 0, iter(self.inserts)
        upcoming = next(pending, None)
        for index in range(len(self.tokens)):
            while upcoming is not None and upcoming[0] <= index:
                shift += len(upcoming[1])
                upcoming = next(pending, None)
            offsets.append(index + shift)
        return offsets

    @property
    def stream_length(self) -> int:
        """How many ids follow the context: the agent's tokens and the inserted ones."""
        return len(self.tokens) + sum(len(inserted) for _, inserted in self.inserts)


class SegmentCollector:
    """Builds segments while a vectorised rollout runs, one open segment per env row."""

    def __init__(self, num_envs: int, episodes_per_row: int | None = None):
        self.open: list[Segment | None] = [None] * num_envs
        self.finished: list[Segment] = []
        self.episodes_ended = [0] * num_envs  # per row
        self.episodes_per_row = episodes_per_row  # if set, a row's segments after this many episodes are dropped

    def begin(self, row: int, context: list[int]) -> None:
        """Open a segment for ``row`` starting from ``context``."""
        self.open[row] = Segment(context=list(context))

    def add(self, row: int, token: int, logprob: float, value: float, ref_logprob: float, score: float,
            scored: bool) -> None:
        """Record one token of ``row``."""
        segment = self.open[row]
        segment.tokens.append(token)
        segment.logprobs.append(logprob)
        segment.values.append(value)
        segment.ref_logprobs.append(ref_logprob)
        segment.scores.append(score)
        segment.scored.append(scored)

    def insert(self, row: int, ids: list[int]) -> None:
        """Record tokens the env put into ``row`` after its last action: context of the next, not actions."""
        segment = self.open[row]
        segment.inserts.append((len(segment.tokens), list(ids)))

    @property
    def complete(self) -> bool:
        """Whether every row has ended ``episodes_per_row`` episodes (never, without it)."""
        return self.episodes_per_row is not None and min(self.episodes_ended) >= self.episodes_per_row

    def open_rows(self) -> list[int]:
        """Rows whose open segment holds tokens (the rollout cut their episodes)."""
        return [row for row, segment in enumerate(self.open) if segment is not None and segment.tokens]

    def close(self, row: int, next_value: float, terminated: bool = False, ended: bool = False,
              reward_components: dict | None = None, group: int | None = None) -> None:
        """Close ``row``'s segment (if it holds tokens, and the row has not yet ended ``episodes_per_row``
        episodes) with its bootstrap value."""
        segment = self.open[row]
        self.open[row] = None
        over_quota = self.episodes_per_row is not None and self.episodes_ended[row] >= self.episodes_per_row
        self.episodes_ended[row] += ended
        if segment is not None and segment.tokens and not over_quota:
            segment.next_value, segment.terminated, segment.ended = next_value, terminated, ended
            segment.reward_components, segment.group = reward_components or {}, group
            self.finished.append(segment)


@dataclass
class Rollout:
    """One rollout as the update reads it.

    :param segments: the finished segments, each with its bootstrap value and reference log-probs filled in.
    :param allowed: the (V,) allowed-token mask the tokens were sampled under, or None (every token).
    :param seconds: wall time of the rollout.
    """

    segments: list[Segment] = field(default_factory=list)
    allowed: torch.Tensor | None = None
    seconds: float = 0.0

    def batch(self, pad_token_id: int, device) -> "SegmentBatch":
        """The segments padded into tensors on ``device``."""
        return SegmentBatch.from_segments(self.segments, pad_token_id, device)


@dataclass
class SegmentBatch:
    """Segments as padded tensors: the sequences (right-aligned) and the per-token statistics (left-aligned)."""

    ids: torch.Tensor  # (S, W) context + tokens, left-padded
    attention_mask: torch.Tensor  # (S, W)
    tokens: torch.Tensor  # (S, T) the agent's tokens
    mask: torch.Tensor  # (S, T) 1 for real tokens
    logprobs: torch.Tensor  # (S, T) log π of the sampling policy (the KL penalty's)
    values: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    scored: torch.Tensor  # (S, T) 1 where the env scored a response
    next_values: torch.Tensor  # (S,)
    offsets: torch.Tensor  # (S, T) where each token lies among the ids after the context
    stream_lengths: torch.Tensor  # (S,) how many ids follow the context (the tokens, and any inserted between)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None  # (S, T) PPO's ratio denominator: ``logprobs`` or recomputed

    @classmethod
    def from_segments(cls, segments: list[Segment], pad_token_id: int, device) -> "SegmentBatch":
        """Pad ``segments`` into tensors on ``device``."""
        ids, attention = pad_left([s.sequence() for s in segments], pad_token_id, device)
        tokens, mask = pad_right([s.tokens for s in segments], pad_token_id, device)
        offsets = pad_right([s.offsets() for s in segments], 0, device)[0]
        stream_lengths = torch.tensor([s.stream_length for s in segments], device=device)
        names = ("logprobs", "values", "ref_logprobs", "scores", "scored")
        per_token = {name: torch.zeros(tokens.shape) for name in names}
        for row, segment in enumerate(segments):
            for name, table in per_token.items():
                table[row, : len(segment.tokens)] = torch.as_tensor(getattr(segment, name), dtype=torch.float32)
        next_values = torch.tensor([s.next_value for s in segments], device=device)
        return cls(ids, attention, tokens, mask.float(), *(per_token[k].to(device) for k in names), next_values,
                   offsets, stream_lengths)

    def compute_advantages(self, scores: torch.Tensor, kl_coef: float, gamma: float, lam: float) -> None:
        """Set ``advantages`` and ``returns``: GAE(γ, λ) over the per-token rewards r_t = scores_t - kl_coef ·
        (log π - log π_ref), ``scores`` being the env's rewards (S, T) after any normalisation."""
        rewards = kl_shaped_rewards(scores, self.logprobs, self.ref_logprobs, self.mask, kl_coef)
        self.advantages, self.returns = gae(rewards, self.values, self.mask, self.next_values, gamma, lam)

    def select(self, rows: list[int]) -> "SegmentBatch":
        """The segments ``rows``, trimmed to the longest of them (sequences and per-token statistics)."""
        index = torch.as_tensor(rows, device=self.mask.device)
        steps = int(self.mask[index].sum(dim=1).max())
        ids, attention = trim_left(self.ids[index], self.attention_mask[index])
        per_token = [None if t is None else t[index][:, :steps] for t in (
            self.tokens, self.mask, self.logprobs, self.values, self.ref_logprobs, self.scores, self.scored)]
        extra = [None if t is None else t[index][:, :steps] for t in (self.advantages, self.returns, self.old_logprobs)]
        return SegmentBatch(ids, attention, *per_token, self.next_values[index], self.offsets[index][:, :steps],
                            self.stream_lengths[index], *extra)

    @property
    def keep(self) -> int:
        """How many of the last columns of ``ids`` hold every token and the state before it: the longest
        stream after a context, plus one."""
        return int(self.stream_lengths.max()) + 1

    def positions(self) -> torch.Tensor:
        """(S, T) column of the state before each token, among the last :attr:`keep` columns of ``ids``."""
        last = self.keep - 1
        columns = last - (self.stream_lengths[:, None] - self.offsets)
        return torch.where(self.mask.bool(), columns, last)  # padding entries point at the last column; masked
