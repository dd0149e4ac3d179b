"""The settings of a language-model env, in one frozen, validated object shared by every env and adapter.

:class:`EnvConfig` is what ``gymnasium.make("LanguageModelEnv-v0", **keywords)``, the vector env, the SB3
``VecEnv`` and the RL library adapters all build from; :class:`MultiTurn` holds the dialogue mode's settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lm_gym.precision import precision_name, resolve_precision
from lm_gym.tools import Toolbox


@dataclass(frozen=True)
class MultiTurn:
    """Settings of the dialogue mode: the agent writes a turn, the env's LM answers as ``reply_role``.

    :param max_turns: agent turns per episode; the episode terminates after the last one.
    :param context_tokens: the whole context budget (observation length); the episode is truncated
        when the next turn no longer fits.
    :param reply_role: chat role of the other party.
    :param reply_temperature: sampling temperature of the other party (0 = greedy).
    :param max_reply_tokens: longest turn of the other party (an LM's reply, a tool result, a game's
        observation); a longer text is cut to fit, and the cut is marked in the turn and counted.
    :param max_tool_calls: tool calls per episode, with ``tools``; those past it get an error result.
    :param tool_timeout: seconds a tool call may run before it counts as timed out.
    """

    max_turns: int = 3
    context_tokens: int = 512
    reply_role: str = "user"
    reply_temperature: float = 0.7
    max_reply_tokens: int = 48
    max_tool_calls: int = 8
    tool_timeout: float = 5.0

    def __post_init__(self):
        if min(self.max_turns, self.context_tokens - 1, self.max_reply_tokens, self.max_tool_calls) < 1:
            raise ValueError(f"max_turns, context_tokens, max_reply_tokens and max_tool_calls must be positive: {self}")
        if self.tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be positive, got {self.tool_timeout}")
        if self.reply_temperature < 0:
            raise ValueError(f"reply_temperature must be >= 0, got {self.reply_temperature}")


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines a language-model env (the keywords of :class:`lm_gym.LanguageModelEnv`).

    :param model: ``"default"`` (SmolLM2-135M-Instruct), ``"tiny"``, a directory, a hub id, or a loaded model.
    :param tokenizer: the tokenizer, required with a loaded model unless it can be loaded from its
        ``name_or_path``.
    :param prompts: a list of prompts (strings or chat message lists), a ``.txt``/``.jsonl`` file, a callable
        ``fn(np_random) -> prompt``, or ``None`` for the 240 shipped default prompts.
    :param reward: a :class:`lm_gym.rewards.Reward` or any callable ``(prompts, responses, **context) ->
        scores``; default ``BlendedReward(FeedbackReward("default"), FluencyReward(), alpha=0.5)``. The reward
        context carries ``response_ids``, ``context_ids`` (the tokens before the response), ``ref_logprobs``
        (per-token reference log-probs, or None with ``reference_logprobs=False``), ``stopped`` and ``turns``
        (the episode's dialogue so far, one ``{"role", "text", ...}`` per turn).
    :param task: a verifiable task instead of ``prompts`` and ``reward``: a name (``"addition"``,
        ``"reverse"``, ``"reasoning-gym:NAME"``) or an :class:`lm_gym.tasks.Task`. The env draws its prompts
        from the task's first :data:`lm_gym.tasks.TRAIN_PROBLEMS` training problems (all of them, for a task
        with fewer) and scores responses with the task's checker (``info["reward_components"]["correct"]``
        says whether the answer was right).
    :param max_new_tokens: response length limit in tokens (per agent turn in multi-turn mode); the reward
        comes on the step that ends the response. Limit lengths here, not with ``gymnasium.make(...,
        max_episode_steps=K)``: Gymnasium's ``TimeLimit`` wrapper, which the env cannot see, truncates after K
        steps, so a K below this cuts responses before the env scores them (reward 0, no ``response_text``).
    :param max_prompt_tokens: prompt length limit, chat formatting included.
    :param use_chat_template: format prompts with the tokenizer's chat template; default on when it has one.
    :param system_prompt: a system message before every prompt given as text (a dialogue keeps its own
        messages): with the chat template, a ``system`` turn; without one, text and a blank line before the
        prompt. Rewards see the prompt without it. ``None``: none (a chat template may add its own default).
    :param stop_token_ids: tokens that end the response; default the EOS token(s).
    :param truncate_prompt: ``None`` (too-long prompts raise), ``"left"`` or ``"right"`` (cut that side).
    :param multi_turn: ``None`` for single-turn episodes, or :class:`MultiTurn` settings (or a dict of them).
        ``tools`` and ``other_party`` make episodes multi-turn (default :class:`MultiTurn` settings).
    :param tools: Python callables with type hints and docstrings (or an :class:`lm_gym.tools.Toolbox`) the
        agent may call: a turn with tool calls gets their results back, a turn without is the final answer
        (:class:`lm_gym.parties.ToolParty`).
    :param other_party: an :class:`lm_gym.parties.OtherParty` that answers the agent's turns (a game, for
        example); default the env's LM, or the tools.
    :param allowed_token_ids: restrict the actions to these token ids (other ids raise); ``action_masks()``
        then marks them, for maskable policies. ``None``: every token is allowed.
    :param reference_logprobs: when the reference scores the agent's tokens. ``True``: during the steps, one
        token at a time through a KV cache (``info["ref_logprob"]`` and the reward context's
        ``ref_logprobs``). ``False``: the env's LM does not run during steps at all (the env only keeps
        tokens); whoever needs reference log-probs scores the finished response once, in one forward
        (``LMPPO`` and ``FluencyReward`` do, with the env's ``reference``).
    :param device: device of the LM; default CUDA when available.
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (or a torch dtype): the dtype of the LM's weights
        when the env loads it; a model passed in loaded is converted only when this is given and not
        ``"auto"``. Default ``None``: ``$LM_GYM_PRECISION``, else ``"auto"`` (bf16 where the hardware runs it
        fast, see :mod:`lm_gym.precision`). The env's log-probs are float32 in every precision.
    """

    model: Any = "default"
    tokenizer: Any = None
    prompts: Any = None
    reward: Any = None
    task: Any = None
    max_new_tokens: int = 48
    max_prompt_tokens: int = 128
    use_chat_template: bool | None = None
    system_prompt: str | None = None
    stop_token_ids: Any = None
    truncate_prompt: str | None = None
    multi_turn: MultiTurn | dict | None = None
    tools: Any = None
    other_party: Any = None
    allowed_token_ids: Any = None
    reference_logprobs: bool = True
    device: str | torch.device | None = None
    precision: str | torch.dtype | None = None

    def __post_init__(self):
        if self.task is not None and (self.prompts is not None or self.reward is not None):
            raise ValueError("task= gives the env its prompts and its reward; leave prompts and reward unset")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
        for name in ("max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.truncate_prompt not in (None, "left", "right"):
            raise ValueError(f"truncate_prompt={self.truncate_prompt!r}; expected None, 'left' or 'right'")
        if self.tools is not None:
            check_tools(self.tools)
        if self.tools is not None and self.other_party is not None:
            raise ValueError("give tools or other_party, not both: tools make a ToolParty the other party")
        if self.multi_turn is None and (self.tools is not None or self.other_party is not None):
            object.__setattr__(self, "multi_turn", MultiTurn())
        if isinstance(self.multi_turn, dict):
            object.__setattr__(self, "multi_turn", MultiTurn(**self.multi_turn))
        if self.multi_turn is not None and not isinstance(self.multi_turn, MultiTurn):
            raise TypeError(f"multi_turn={self.multi_turn!r:.80}; expected None, a MultiTurn or a dict of its fields")
        if self.multi_turn is not None and self.multi_turn.context_tokens <= self.max_prompt_tokens:
            raise ValueError(
                f"multi_turn.context_tokens={self.multi_turn.context_tokens} leaves no room after "
                f"max_prompt_tokens={self.max_prompt_tokens}"
            )
        if self.precision is not None:
            precision_name(self.precision)  # raises on an unknown precision
        if not isinstance(self.reference_logprobs, (bool, np.bool_)):
            raise TypeError(f"reference_logprobs must be True or False, got {self.reference_logprobs!r}")

    @classmethod
    def of(cls, config: EnvConfig | None = None, **settings: Any) -> EnvConfig:
        """``config`` (default: the defaults) with ``settings`` replacing its fields; unknown names raise."""
        if config is not None and not isinstance(config, EnvConfig):
            raise TypeError(
                f"config={config!r:.80} is not an EnvConfig; pass env settings by keyword, e.g. model='tiny'"
            )
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:  # Python's own wording, which clients match on (TorchRL's GymEnv retries without frameskip)
            raise TypeError(f"got an unexpected keyword argument {unknown[0]!r} (unknown env settings: {unknown}); "
                            f"expected among {list(cls.field_names())}")
        return dataclasses.replace(config or cls(), **settings)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the settings, in order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def lm_dtype(self) -> torch.dtype | None:
        """The dtype the env's LM gets: the precision's for a model loaded here, and for a loaded model only
        when ``precision`` names one explicitly (None: leave it as it is)."""
        loaded_here = isinstance(self.model, (str, os.PathLike))
        explicit = self.precision is not None and precision_name(self.precision) != "auto"
        if not (loaded_here or explicit):
            return None
        return resolve_precision(self.precision, self.device).dtype

    @property
    def obs_length(self) -> int:
        """Observation length L: ``max_prompt_tokens + max_new_tokens``, or the multi-turn context budget."""
        return self.multi_turn.context_tokens if self.multi_turn else self.max_prompt_tokens + self.max_new_tokens


def check_tools(tools: Any) -> None:
    """Raise unless ``tools`` is a :class:`lm_gym.tools.Toolbox` or a list of callables."""
    if isinstance(tools, Toolbox) or (isinstance(tools, Sequence) and not isinstance(tools, (str, bytes))):
        return
    hint = f" (one tool: tools=[{tools.__name__}])" if callable(tools) and hasattr(tools, "__name__") else ""
    raise TypeError(f"tools={tools!r:.80} is not a list of callables{hint}; expected a list of functions "
                    "with type hints and docstrings, or an lm_gym.tools.Toolbox")
