"""The rules of the token-level language-model task, for N episodes at once.

:class:`TokenEpisodes` draws and encodes prompts, takes one token per row per step, tracks the
reference log-prob of each token, ends episodes on a stop token or at the length limit, decodes the texts
once at the end and scores all finished rows in one reward call. In multi-turn mode it also lets the
LM answer as the other party between the agent's turns. Both Gymnasium envs are thin layers over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from lm_gym.chat import TurnMarkers, encode_prompt, turn_markers
from lm_gym.data.prompts import Prompt, PromptSampler, prompt_text, validate_prompt
from lm_gym.episodes import EpisodeBatch, output_vocab_size
from lm_gym.rewards.base import Reward


@dataclass(frozen=True)
class MultiTurn:
    """Settings of the dialogue mode: the agent writes a turn, the env's LM answers as ``reply_role``.

    :param max_turns: agent turns per episode; the episode terminates after the last one.
    :param context_tokens: the whole context budget (observation length); the episode is truncated
        when the next turn no longer fits.
    :param reply_role: chat role of the other party.
    :param reply_temperature: sampling temperature of the other party (0 = greedy).
    :param max_reply_tokens: longest reply of the other party.
    """

    max_turns: int = 3
    context_tokens: int = 512
    reply_role: str = "user"
    reply_temperature: float = 0.7
    max_reply_tokens: int = 48

    def __post_init__(self):
        if self.max_turns < 1 or self.context_tokens < 2 or self.max_reply_tokens < 1:
            raise ValueError(f"max_turns, context_tokens and max_reply_tokens must be positive: {self}")
        if self.reply_temperature < 0:
            raise ValueError(f"reply_temperature must be >= 0, got {self.reply_temperature}")


class StepResult(NamedTuple):
    """What one step gives per row: reference log-prob, reward, flags, and infos of rows that ended a turn."""

    ref_logprob: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    infos: list[dict]


class TokenEpisodes:
    """N episodes of the token-level LM task over one :class:`EpisodeBatch` (see the module docstring).

    Keywords are those of :class:`lm_gym.LanguageModelEnv`, already resolved (loaded model, sampler, reward).
    """

    def __init__(
        self, model, tokenizer, num_rows: int, prompts: PromptSampler, reward: Reward, *,
        max_new_tokens: int, max_prompt_tokens: int, use_chat_template: bool,
        stop_token_ids: Sequence[int], truncate_prompt: str | None, multi_turn: MultiTurn | None,
        allowed_token_ids: Sequence[int] | None = None, reference_logprobs: bool = True,
    ):
        self.tokenizer, self.prompts, self.reward = tokenizer, prompts, reward
        self.reference_logprobs = reference_logprobs
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.use_chat_template, self.truncate_prompt, self.multi_turn = use_chat_template, truncate_prompt, multi_turn
        self.vocab_size = output_vocab_size(model)
        self.obs_length = multi_turn.context_tokens if multi_turn else max_prompt_tokens + max_new_tokens
        self.batch = EpisodeBatch(model, num_rows, self.obs_length, tokenizer.pad_token_id, base_model=True,
                                  score=reference_logprobs)
        self.device = self.batch.device
        self.stop_token_ids = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        self.markers = self._markers() if multi_turn else None
        self.allowed = allowed_mask(allowed_token_ids, self.vocab_size)
        self.ref_logprobs = torch.zeros(num_rows, self.obs_length, device=self.device)
        self.turn_start = torch.zeros(num_rows, dtype=torch.long, device=self.device)
        self.turns: list[list[dict]] = [[] for _ in range(num_rows)]
        self.reply_generators: list[torch.Generator | None] = [None] * num_rows

    def _markers(self) -> TurnMarkers:
        stop_text = self.tokenizer.decode(self.stop_token_ids[:1].tolist())
        return turn_markers(self.tokenizer, self.multi_turn.reply_role, self.use_chat_template, stop_text)

    # --- reset ---------------------------------------------------------------------------------------

    def reset_rows(self, rows: Sequence[int], rngs: Sequence[np.random.Generator], prompts=None) -> list[dict]:
        """Start new episodes in ``rows``: draw (or take) a prompt per row, encode it, prefill in one forward."""
        prompts = [
            self.prompts(rng) if prompt is None else validate_prompt(prompt, "options['prompt']")
            for rng, prompt in zip(rngs, prompts or [None] * len(rows))
        ]
        contexts = [self._encode(prompt) for prompt in prompts]  # raises before any row changes
        for row, rng, prompt in zip(rows, rngs, prompts):
            self.turns[row] = [{"role": "user", "text": prompt_text(prompt)}]
            self.reply_generators[row] = self._reply_generator(rng) if self.multi_turn else None
        self.batch.prefill(rows, contexts)
        self.turn_start[list(rows)] = self.batch.lengths[list(rows)]
        return [{"prompt_text": prompt_text(prompt)} for prompt in prompts]

    def _encode(self, prompt: Prompt) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt, self.use_chat_template)
        if len(ids) <= self.max_prompt_tokens:
            return ids
        if self.truncate_prompt == "left":
            return ids[-self.max_prompt_tokens :]
        if self.truncate_prompt == "right":
            return ids[: self.max_prompt_tokens]
        raise ValueError(
            f"the prompt is {len(ids)} tokens long, more than max_prompt_tokens={self.max_prompt_tokens}: "
            f"{prompt_text(prompt)!r:.120}. Raise max_prompt_tokens, shorten the prompt, "
            "or pass truncate_prompt='left' or 'right' to cut it explicitly."
        )

    def _reply_generator(self, rng: np.random.Generator) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(rng.integers(2**62)))
        return generator

    # --- step ----------------------------------------------------------------------------------------

    def step(self, actions: torch.Tensor, active: torch.Tensor) -> StepResult:
        """Append ``actions[i]`` to every ``active`` row; end turns and episodes; score the ended ones."""
        batch = self.batch
        ref = batch.logprobs_of(actions)
        rows = active.nonzero().squeeze(1)
        self.ref_logprobs[rows, batch.lengths[rows]] = ref[rows]
        length = batch.lengths + 1
        stop = torch.isin(actions, self.stop_token_ids)
        limit = (length - self.turn_start >= self.max_new_tokens) | (length >= self.obs_length)
        turn_over = active & (stop | limit)
        batch.append(actions, record=active, forward=active & ~turn_over)
        reward = torch.zeros(batch.num_rows, device=self.device)
        terminated = active & stop if not self.multi_turn else torch.zeros_like(active)
        truncated = turn_over & ~stop if not self.multi_turn else torch.zeros_like(active)
        infos: list[dict] = [{} for _ in range(batch.num_rows)]
        ended = turn_over.nonzero().squeeze(1).tolist()
        if ended:
            self._score(ended, reward, infos)
            if self.multi_turn:
                self._next_turns(ended, stop, terminated, truncated, infos)
        return StepResult(ref, reward, terminated, truncated, infos)

    def _score(self, rows: list[int], reward: torch.Tensor, infos: list[dict]) -> None:
        """Decode the finished turns of ``rows`` once and score them in one reward call."""
        responses, response_ids, context_ids, ref_logprobs, stopped = [], [], [], [], []
        stop_ids = self.stop_token_ids.tolist()
        for row in rows:
            start, end = int(self.turn_start[row]), int(self.batch.lengths[row])
            tokens = self.batch.row_tokens(row)
            ids = tokens[start:]
            response_ids.append(ids)
            context_ids.append(tokens[:start])
            ref_logprobs.append(self.ref_logprobs[row, start:end])
            stopped.append(bool(ids) and ids[-1] in stop_ids)
            responses.append(self.decode_response(ids))
        prompts = [self.turns[row][-1]["text"] for row in rows]
        output = self.reward.evaluate(
            prompts, responses, response_ids=response_ids, context_ids=context_ids, stopped=stopped,
            ref_logprobs=ref_logprobs if self.reference_logprobs else None,
        )
        reward[rows] = output.total.to(self.device)
        for j, row in enumerate(rows):
            self.turns[row].append({"role": "assistant", "text": responses[j]})
            infos[row].update(
                prompt_text=prompts[j],
                response_text=responses[j],
                reward_components={name: float(values[j]) for name, values in output.components.items()},
            )

    def decode_response(self, ids: list[int]) -> str:
        """Response text: the tokens without a final stop token, special tokens skipped."""
        if ids and ids[-1] in self.stop_token_ids.tolist():
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- multi-turn ----------------------------------------------------------------------------------

    def _next_turns(self, rows, stop, terminated, truncated, infos) -> None:
        """After agent turns end: terminate after the last turn, truncate when the budget is spent, else reply."""
        replying, contexts = [], []
        for row in rows:
            infos[row]["turns"] = [dict(turn) for turn in self.turns[row]]
            agent_turns = sum(turn["role"] == "assistant" for turn in self.turns[row])
            if agent_turns >= self.multi_turn.max_turns:
                terminated[row] = True
                continue
            context = self.batch.row_tokens(row)
            if not bool(stop[row]):
                context.append(int(self.stop_token_ids[0]))  # close a turn cut at max_new_tokens
            context += self.markers.after_agent
            room = self.obs_length - len(context) - len(self.markers.after_reply) - 1
            if room < 1:
                truncated[row] = True
                continue
            replying.append(row)
            contexts.append((context, min(room, self.multi_turn.max_reply_tokens)))
        if replying:
            self._reply(replying, contexts)

    def _reply(self, rows: list[int], contexts: list[tuple[list[int], int]]) -> None:
        """Let the LM write the other party's turn for ``rows`` (batched), then prefill the extended contexts."""
        replies = sample_continuations(
            self.batch.model, [context for context, _ in contexts], [limit for _, limit in contexts],
            [self.reply_generators[row] for row in rows], self.multi_turn.reply_temperature,
            self.stop_token_ids, self.tokenizer.pad_token_id, self.obs_length,
        )
        extended = []
        for row, (context, _), reply in zip(rows, contexts, replies):
            self.turns[row].append({"role": self.multi_turn.reply_role, "text": self.decode_response(reply)})
            if not reply or reply[-1] not in self.stop_token_ids.tolist():
                reply = reply + [int(self.stop_token_ids[0])]
            extended.append(context + reply + self.markers.after_reply)
        self.batch.prefill(rows, extended)
        self.turn_start[rows] = self.batch.lengths[rows]

    def observation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-aligned token ids and attention masks of all rows."""
        return self.batch.observation(self.obs_length)

    def dialogue_text(self, row: int, with_partial_turn: bool) -> str:
        """The row's dialogue as ``[role] text`` lines, optionally with the agent's unfinished turn."""
        lines = [f"[{turn['role']}] {turn['text']}" for turn in self.turns[row]]
        if with_partial_turn:
            partial = self.batch.row_tokens(row, int(self.turn_start[row]))
            lines.append(f"[assistant] {self.decode_response(partial)}")
        return "\n".join(lines)


def allowed_mask(allowed_token_ids: Sequence[int] | None, vocab_size: int) -> np.ndarray | None:
    """A boolean (V,) mask of the allowed actions, or None when every token is allowed."""
    if allowed_token_ids is None:
        return None
    ids = np.asarray(list(allowed_token_ids))
    if ids.size == 0 or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {allowed_token_ids!r:.80}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"allowed_token_ids must lie in [0, {vocab_size}); got min {ids.min()}, max {ids.max()}")
    mask = np.zeros(vocab_size, dtype=bool)
    mask[ids] = True
    return mask


@torch.no_grad()
def sample_continuations(
    model, contexts: list[list[int]], limits: list[int], generators: list[torch.Generator],
    temperature: float, stop_token_ids: torch.Tensor, pad_token_id: int, max_tokens: int,
) -> list[list[int]]:
    """Sample one continuation per context (batched, KV-cached), each row with its own generator.

    Each continuation ends with a stop token or after ``limits[i]`` tokens. Rows draw their Gumbel noise
    from their own generator, so a row's text does not depend on which other rows share the batch.
    """
    batch = EpisodeBatch(model, len(contexts), max_tokens, pad_token_id, base_model=True)
    batch.prefill(range(len(contexts)), contexts)
    outputs: list[list[int]] = [[] for _ in contexts]
    running = torch.ones(len(contexts), dtype=torch.bool, device=batch.device)
    limit = torch.as_tensor(limits, device=batch.device)
    for step in range(max(limits)):
        tokens = _sample(batch.next_logprobs, temperature, generators, running)
        for row in running.nonzero().squeeze(1).tolist():
            outputs[row].append(int(tokens[row]))
        finished = running & (torch.isin(tokens, stop_token_ids) | (step + 1 >= limit))
        batch.append(tokens, record=running, forward=running & ~finished)
        running &= ~finished
        if not bool(running.any()):
            break
    return outputs


def _sample(logprobs: torch.Tensor, temperature: float, generators, running: torch.Tensor) -> torch.Tensor:
    """Gumbel-max sampling at ``temperature``; only running rows draw noise from their generators."""
    if temperature == 0:
        return logprobs.argmax(dim=-1)
    noise = torch.zeros_like(logprobs)
    for row in running.nonzero().squeeze(1).tolist():
        uniform = torch.rand(logprobs.shape[1], generator=generators[row], device=logprobs.device)
        noise[row] = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))
    return (logprobs / temperature + noise).argmax(dim=-1)


def resolve_stop_tokens(tokenizer, model, stop_token_ids) -> list[int]:
    """The stop tokens: those given, else the tokenizer's EOS plus the generation config's EOS ids."""
    if stop_token_ids is not None:
        ids = [int(i) for i in np.atleast_1d(stop_token_ids)]
    else:
        ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids += [i for i in np.atleast_1d(eos).tolist() if i is not None and i not in ids] if eos is not None else []
    if not ids:
        raise ValueError("no stop token: the tokenizer has no EOS token; pass stop_token_ids=[...]")
    return ids


