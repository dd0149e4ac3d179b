"""The rules of the token-level language-model task, for N episodes at once.

:class:`TokenEpisodes` draws and encodes prompts, takes one token per row per step, tracks the
reference log-prob of each token, ends episodes on a stop token or at the length limit, decodes the texts
once at the end and scores all finished rows in one reward call. In multi-turn mode it also lets the
LM answer as the other party between the agent's turns. Both Gymnasium envs are thin layers over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from lm_gym.chat import TurnMarkers, encode_prompt, has_chat_template, turn_markers
from lm_gym.config import EnvConfig
from lm_gym.data.prompts import Prompt, PromptSampler, load_prompts, prompt_text, validate_prompt
from lm_gym.episode_batch import EpisodeBatch
from lm_gym.models import output_vocab_size, resolve_model
from lm_gym.parties import Answer, OtherParty, make_party
from lm_gym.reference import ReferenceModel
from lm_gym.rewards import Reward, as_reward, default_reward
from lm_gym.sampling import sample_continuations

TURN_ENDED_KEY = "turn_ended"  # in the info of a step that ended an agent turn: its reward is the turn's


@dataclass(frozen=True)
class TurnEnd:
    """The record of an agent turn that just ended: the texts the reward scored and its components.

    Made in one place (:meth:`TokenEpisodes.step`) and turned into info entries in one place (:meth:`info`).
    """

    prompt_text: str
    response_text: str
    reward_components: dict[str, float]
    turns: list[dict] | None = None  # multi-turn: the dialogue so far, one {"role", "text"} per turn

    def info(self) -> dict:
        """The entries this record adds to the Gymnasium (and SB3) info of the step that ended the turn:
        ``turn_ended`` (True: this step's reward is the turn's), the texts and the reward's components."""
        info = {TURN_ENDED_KEY: True, "prompt_text": self.prompt_text, "response_text": self.response_text,
                "reward_components": dict(self.reward_components)}
        if self.turns is not None:
            info["turns"] = [dict(turn) for turn in self.turns]
        return info


class StepResult(NamedTuple):
    """What one step gives per row: reference log-prob, reward, flags, and the record of each ended turn.

    ``turn_ends[i]`` is not None exactly where row i's reward was computed at this step (the token that
    carries the reward); ``reward[i]`` is 0 elsewhere.
    """

    ref_logprob: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    turn_ends: list[TurnEnd | None]


class TokenEpisodes:
    """N episodes of the token-level LM task over one :class:`EpisodeBatch` (see the module docstring).

    :param config: the env's settings.
    :param num_rows: number of episodes stepped together.
    :param reference: the env's LM as the reference model (it scores tokens during steps, the reward binds to it).
    :param prompts: the prompt sampler.
    :param reward: the reward, already bound to ``reference``.
    :param stop_token_ids: the tokens that end a turn.
    :param party: the other party of multi-turn episodes (:mod:`lm_gym.parties`); None: the env's LM answers.

    :meth:`from_config` loads the model and builds all of these from the settings.
    """

    def __init__(self, config: EnvConfig, num_rows: int, reference: ReferenceModel, prompts: PromptSampler,
                 reward: Reward, stop_token_ids: Sequence[int], party: OtherParty | None = None):
        self.config, self.reference, self.prompts, self.reward, self.party = config, reference, prompts, reward, party
        self.tokenizer = reference.tokenizer
        self.reference_logprobs, self.multi_turn = config.reference_logprobs, config.multi_turn
        self.use_chat_template = _use_chat_template(config.use_chat_template, self.tokenizer)
        self.vocab_size = output_vocab_size(reference.model)
        self.obs_length = config.obs_length
        self.batch = EpisodeBatch(reference, num_rows, self.obs_length, self.tokenizer.pad_token_id,
                                  score=config.reference_logprobs)
        self.device = self.batch.device
        self.stop_token_ids = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        self._markers: dict[str, TurnMarkers] = {}
        if party is not None:
            party.bind(self.tokenizer, self.use_chat_template)
        self._turn_end = self._tokens_that_may_end(party.turn_end_text) if party and party.turn_end_text else None
        if self._turn_end is not None:  # the tail a step decodes: tokens enough to spell the text
            self._turn_end_width = len(self.tokenizer(party.turn_end_text, add_special_tokens=False).input_ids) + 2
        self.allowed = allowed_mask(config.allowed_token_ids, self.vocab_size)
        self.ref_logprobs = torch.zeros(num_rows, self.obs_length, device=self.device)
        self.chosen = torch.zeros(num_rows, self.obs_length, dtype=torch.bool, device=self.device)  # agent's ids
        self.turn_start = torch.zeros(num_rows, dtype=torch.long, device=self.device)
        self.turns: list[list[dict]] = [[] for _ in range(num_rows)]
        self.reply_generators: list[torch.Generator | None] = [None] * num_rows

    @classmethod
    def from_config(cls, config: EnvConfig, num_rows: int) -> TokenEpisodes:
        """Load the model and resolve the prompts, the reward and the stop tokens of ``config``."""
        model, tokenizer = resolve_model(config.model, config.tokenizer, config.device, config.lm_dtype())
        reference = ReferenceModel(model, tokenizer)
        prompts, reward = config.prompts, config.reward
        if config.task is not None:
            from lm_gym.tasks import TRAIN_PROBLEMS, make_task  # here: lm_gym.tasks' evaluation imports this module

            task = make_task(config.task)
            problems = task.problems("train", TRAIN_PROBLEMS, at_most=True)
            prompts, reward = [problem.prompt for problem in problems], task.reward(problems)
            if task.tools and config.tools is None and config.other_party is None:  # the task's tools, multi-turn
                config = dataclasses.replace(config, tools=list(task.tools))
        reward = as_reward(reward) if reward is not None else default_reward()
        reward.bind(reference)
        stop_token_ids = resolve_stop_tokens(tokenizer, model, config.stop_token_ids)
        return cls(config, num_rows, reference, load_prompts(prompts), reward, stop_token_ids, make_party(config))

    def _tokens_that_may_end(self, text: str) -> torch.Tensor:
        """(V,) True on the tokens whose text holds the last character of ``text``: only a step that takes one
        of them can complete it, so only those steps decode the turn's tail."""
        pieces = self.tokenizer.batch_decode([[token] for token in range(len(self.tokenizer))])
        may_end = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        may_end[: len(pieces)] = torch.tensor([text[-1] in piece for piece in pieces], dtype=torch.bool)
        return may_end

    def markers(self, role: str) -> TurnMarkers:
        """The ids around a turn of ``role`` between two of the agent's (derived once per role)."""
        if role not in self._markers:
            stop_text = self.tokenizer.decode(self.stop_token_ids[:1].tolist())
            self._markers[role] = turn_markers(self.tokenizer, role, self.use_chat_template, stop_text)
        return self._markers[role]

    # --- reset ---------------------------------------------------------------------------------------

    def reset_rows(self, rows: Sequence[int], rngs: Sequence[np.random.Generator], prompts=None) -> None:
        """Start new episodes in ``rows``: draw (or take) a prompt per row, encode it, prefill in one forward.

        Reset infos stay empty: clients that learn one set of info keys from every step (TorchRL's ``GymEnv``)
        cannot hold text, and the prompt comes with the response in the info of the turn's last step.
        """
        own = [self.party.start(row, rng) if self.party else None for row, rng in zip(rows, rngs)]
        prompts = [
            validate_prompt(prompt, "options['prompt']") if prompt is not None
            else validate_prompt(party_prompt, "the other party's prompt") if party_prompt is not None
            else self.prompts(rng)
            for rng, prompt, party_prompt in zip(rngs, prompts or [None] * len(rows), own)
        ]
        contexts = [self._encode(prompt) for prompt in prompts]  # raises before any row changes
        for row, rng, prompt in zip(rows, rngs, prompts):
            self.turns[row] = [{"role": "user", "text": prompt_text(prompt)}]
            self.reply_generators[row] = self._reply_generator(rng) if self.multi_turn else None
        self.batch.prefill(rows, contexts)
        self.chosen[list(rows)] = False
        self.turn_start[list(rows)] = self.batch.lengths[list(rows)]

    def _encode(self, prompt: Prompt) -> list[int]:
        party = self.party
        ids = encode_prompt(self.tokenizer, prompt, self.use_chat_template, self.config.system_prompt,
                            party and party.system_text(), party and party.template_tools())
        limit, truncate = self.config.max_prompt_tokens, self.config.truncate_prompt
        if len(ids) <= limit:
            return ids
        if truncate == "left":
            return ids[-limit:]
        if truncate == "right":
            return ids[:limit]
        raise ValueError(
            f"the prompt is {len(ids)} tokens long, more than max_prompt_tokens={limit}: "
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
        self.chosen[rows, batch.lengths[rows]] = True
        length = batch.lengths + 1
        stop = torch.isin(actions, self.stop_token_ids)
        limit = (length - self.turn_start >= self.config.max_new_tokens) | (length >= self.obs_length)
        turn_over = active & (stop | limit)
        # Multi-turn, a turn's last token is run too: the next turn's ids then extend the row's KV history.
        batch.append(actions, record=active, forward=active if self.multi_turn else active & ~turn_over)
        if self._turn_end is not None:  # a completed tool call is answered at once
            turn_over |= self._turns_ending_with(active & ~turn_over & self._turn_end[actions])
        reward = torch.zeros(batch.num_rows, device=self.device)
        terminated = active & stop if not self.multi_turn else torch.zeros_like(active)
        truncated = turn_over & ~stop if not self.multi_turn else torch.zeros_like(active)
        turn_ends: list[TurnEnd | None] = [None] * batch.num_rows
        ended = turn_over.nonzero().squeeze(1).tolist()
        if ended and self.party is not None:
            self._party_turns(ended, stop, reward, terminated, truncated, turn_ends)
        elif ended:
            self._score(ended, reward, turn_ends)
            if self.multi_turn:
                self._next_turns(ended, stop, terminated, truncated, turn_ends)
        return StepResult(ref, reward, terminated, truncated, turn_ends)

    def _score(self, rows: list[int], reward: torch.Tensor, turn_ends: list) -> None:
        """Decode the finished turns of ``rows`` once and score them in one reward call: against the turn
        before (the prompt, or the env LM's last reply), or, with an other party, against the episode's
        prompt, the dialogue so far in the reward's context (``turns``)."""
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
        prompts = [self.turns[row][0 if self.party else -1]["text"] for row in rows]
        output = self.reward.evaluate(
            prompts, responses, response_ids=response_ids, context_ids=context_ids, stopped=stopped,
            ref_logprobs=ref_logprobs if self.reference_logprobs else None,
            turns=[[dict(turn) for turn in self.turns[row]] for row in rows],
        )
        reward[rows] = output.total.to(self.device)
        for j, row in enumerate(rows):
            self.turns[row].append({"role": "assistant", "text": responses[j]})
            components = {name: float(values[j]) for name, values in output.components.items()}
            turn_ends[row] = TurnEnd(prompts[j], responses[j], components)

    def decode_response(self, ids: list[int]) -> str:
        """Response text: the tokens without a final stop token, special tokens skipped."""
        if ids and ids[-1] in self.stop_token_ids.tolist():
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- multi-turn ----------------------------------------------------------------------------------

    def _next_turns(self, rows, stop, terminated, truncated, turn_ends) -> None:
        """After agent turns end: terminate after the last turn, truncate when the budget is spent, else reply."""
        replying, openings = [], []
        for row in rows:
            turn_ends[row] = dataclasses.replace(turn_ends[row], turns=[dict(turn) for turn in self.turns[row]])
            if self._agent_turns(row) >= self.multi_turn.max_turns:
                terminated[row] = True
                continue
            opening, room = self._opening(row, bool(stop[row]), self.markers(self.multi_turn.reply_role))
            if room < 1:
                truncated[row] = True
                continue
            replying.append(row)
            openings.append((opening, min(room, self.multi_turn.max_reply_tokens)))
        if replying:
            self._reply(replying, openings)

    def _reply(self, rows: list[int], openings: list[tuple[list[int], int]]) -> None:
        """Let the LM write the other party's turn for ``rows`` (batched), then run the new ids of each row."""
        replies = sample_continuations(
            self.reference, [self.batch.row_tokens(row) + opening for row, (opening, _) in zip(rows, openings)],
            [limit for _, limit in openings], [self.reply_generators[row] for row in rows],
            self.multi_turn.reply_temperature, self.stop_token_ids, self.tokenizer.pad_token_id, self.obs_length,
        )
        additions = []
        for row, (opening, _), reply in zip(rows, openings, replies):
            self.turns[row].append({"role": self.multi_turn.reply_role, "text": self.decode_response(reply)})
            if not reply or reply[-1] not in self.stop_token_ids.tolist():
                reply = reply + [int(self.stop_token_ids[0])]
            additions.append(opening + reply + self.markers(self.multi_turn.reply_role).after_reply)
        self._insert(rows, additions)

    def _insert(self, rows: list[int], additions: list[list[int]]) -> None:
        """Append the other party's turns to ``rows`` (one batched forward of the new ids alone) and start the
        agent's next turn after them."""
        self.batch.extend(rows, additions)
        self.turn_start[rows] = self.batch.lengths[rows]

    def _opening(self, row: int, stopped: bool, markers: TurnMarkers) -> tuple[list[int], int]:
        """The ids that close the row's agent turn and open the other party's, and the room left for that
        turn's text (the agent's next turn needs the closing markers and at least one token)."""
        opening = ([] if stopped else [int(self.stop_token_ids[0])]) + markers.after_agent  # close a cut turn
        used = int(self.batch.lengths[row]) + len(opening) + len(markers.after_reply)
        return opening, self.obs_length - used - 1

    # --- another party -------------------------------------------------------------------------------

    def _party_turns(self, rows: list[int], stop, reward, terminated, truncated, turn_ends) -> None:
        """After agent turns end, with an other party: it answers each turn (and may reward it), the env's
        reward scores the turns left unrewarded, and each episode ends or takes the answer's ids."""
        texts = [self.decode_response(self.batch.row_tokens(row, int(self.turn_start[row]))) for row in rows]
        last = [self._agent_turns(row) + 1 >= self.multi_turn.max_turns for row in rows]
        answers = self.party.answer(rows, texts, last)
        unrewarded = [row for row, answer in zip(rows, answers) if answer.reward is None]
        if unrewarded:
            self._score(unrewarded, reward, turn_ends)
        inserting, additions = [], []
        for row, text, answer, final in zip(rows, texts, answers, last):
            if answer.reward is not None:
                reward[row] = answer.reward
                prompt = self.turns[row][-1]["text"]
                self.turns[row].append({"role": "assistant", "text": text})
                turn_ends[row] = TurnEnd(prompt, text, {"other_party": float(reward[row])})
            self.turns[row][-1].update(answer.record)
            addition = self._answer_ids(row, bool(stop[row]), answer) if not final else None
            if addition is None:
                ended_by_rules = answer.text is None and answer.terminated
                terminated[row], truncated[row] = ended_by_rules, not ended_by_rules
            else:
                inserting.append(row)
                additions.append(addition)
            turn_ends[row] = dataclasses.replace(turn_ends[row], turns=[dict(turn) for turn in self.turns[row]])
        if inserting:
            self._insert(inserting, additions)

    def _answer_ids(self, row: int, stopped: bool, answer: Answer) -> list[int] | None:
        """The ids that put ``answer``'s turn after the row's, or None when the episode ends here (the party
        ended it, or no room is left). A text longer than the room left or ``max_reply_tokens`` is cut, with a
        marker saying how many tokens were cut, and the turn's entry counts them (``cut_tokens``)."""
        if answer.text is None:
            return None
        markers = self.markers(self.party.role)
        opening, room = self._opening(row, stopped, markers)
        limit = min(room, self.multi_turn.max_reply_tokens)
        if limit < 1:
            return None
        ids = self.tokenizer(answer.text, add_special_tokens=False).input_ids
        turn = {"role": self.party.role, "text": answer.text}
        if len(ids) > limit:
            kept, marker = self._cut(ids, limit)
            turn["text"], turn["cut_tokens"] = self.tokenizer.decode(kept + marker), len(ids) - len(kept)
            ids = kept + marker
        self.turns[row].append(turn)
        return opening + ids + markers.after_reply

    def _cut(self, ids: list[int], limit: int) -> tuple[list[int], list[int]]:
        """The first ids of a too-long turn, and a marker of how many were cut, together at most ``limit``."""
        keep = limit
        for _ in range(3):  # the marker's length depends on the count it shows
            keep = max(limit - len(self._cut_marker(len(ids) - keep)), 0)
        marker = self._cut_marker(len(ids) - keep)
        return ids[:keep], marker[: limit - keep]

    def _cut_marker(self, count: int) -> list[int]:
        return self.tokenizer(f" [... {count} tokens cut]", add_special_tokens=False).input_ids

    def _turns_ending_with(self, candidates: torch.Tensor) -> torch.Tensor:
        """(N,) True on the ``candidates`` rows whose agent turn so far ends with the party's ``turn_end_text``."""
        text = self.party.turn_end_text
        ending = torch.zeros_like(candidates)
        for row in candidates.nonzero().squeeze(1).tolist():
            start = max(int(self.turn_start[row]), int(self.batch.lengths[row]) - self._turn_end_width)
            ending[row] = self.tokenizer.decode(self.batch.row_tokens(row, start)).endswith(text)
        return ending

    def _agent_turns(self, row: int) -> int:
        return sum(turn["role"] == "assistant" for turn in self.turns[row])

    def observation(self) -> dict[str, torch.Tensor]:
        """Right-aligned ``input_ids`` and ``attention_mask`` of all rows; multi-turn, ``agent_mask`` too (1
        where the agent chose the id, 0 at the prompt's and every inserted id)."""
        ids, mask = self.batch.observation(self.obs_length)
        if not self.multi_turn:
            return {"input_ids": ids, "attention_mask": mask}
        chosen = self.batch.right_aligned(self.chosen, self.obs_length, False)
        return {"input_ids": ids, "attention_mask": mask, "agent_mask": chosen.long()}

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




def _use_chat_template(setting: bool | None, tokenizer) -> bool:
    """Whether to format prompts with the chat template: the setting, or whether the tokenizer has one."""
    if setting is None:
        return has_chat_template(tokenizer)
    if setting and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    return bool(setting)


def step_infos(result: StepResult, with_ref_logprob: bool) -> list[dict]:
    """The Gymnasium info dict of every row after a step: ``ref_logprob`` (when the env scores tokens during
    steps) and, where a turn ended, its record's entries (:meth:`TurnEnd.info`)."""
    ref = result.ref_logprob.double().cpu().tolist() if with_ref_logprob else None
    infos = []
    for row, turn_end in enumerate(result.turn_ends):
        info = {} if ref is None else {"ref_logprob": ref[row]}
        infos.append(info if turn_end is None else {**info, **turn_end.info()})
    return infos
