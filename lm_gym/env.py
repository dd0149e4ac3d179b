"""``LanguageModelEnv``: one episode at a time, one token per step (a :class:`gymnasium.Env`)."""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from lm_gym.chat import has_chat_template
from lm_gym.core import MultiTurn, TokenEpisodes, resolve_stop_tokens
from lm_gym.data.prompts import load_prompts
from lm_gym.models import ensure_pad_token, load_model, load_tokenizer
from lm_gym.rewards import as_reward, default_reward

RESET_OPTIONS = {"prompt"}


class EpisodesOwner:
    """The ``model`` and ``tokenizer`` of an env that steps its episodes through ``self.core``."""

    @property
    def tokenizer(self):
        """The env's tokenizer."""
        return self.core.tokenizer

    @property
    def model(self):
        """The env's LM (also the reference model of ``ref_logprob``)."""
        return self.core.batch.model


class LanguageModelEnv(EpisodesOwner, gym.Env):
    """A causal language model as an RL environment: actions are tokens, observations the ids so far.

    Each episode starts from a prompt; every step appends the agent's token. The episode terminates on a
    stop token and is truncated at ``max_new_tokens``. The reward comes on the last step (0 before), from
    ``reward`` scoring the decoded prompt and response. ``info["ref_logprob"]`` is log π_ref of the token
    under the env's LM, computed incrementally with a KV cache (one new token per step).

    Observations are ``{"input_ids", "attention_mask"}``, each int64 of length L = ``max_prompt_tokens +
    max_new_tokens`` (``multi_turn.context_tokens`` in multi-turn mode), left-padded so that the last
    position is always the latest token. The action space is ``Discrete(V)`` with V the rows of the model's
    output embedding (ids past the tokenizer's vocabulary are valid actions that decode to nothing).

    :param model: ``"default"`` (SmolLM2-135M-Instruct), ``"tiny"``, a directory, a hub id, or a loaded model.
    :param tokenizer: the tokenizer, required with a loaded model unless it can be loaded from its
        ``name_or_path``.
    :param prompts: a list of prompts (strings or chat message lists), a ``.txt``/``.jsonl`` file, a callable
        ``fn(np_random) -> prompt``, or ``None`` for the 240 shipped default prompts.
    :param reward: a :class:`lm_gym.rewards.Reward` or any callable ``(prompts, responses, **context) ->
        scores``; default ``BlendedReward(FeedbackReward("default"), FluencyReward(), alpha=0.5)``. The reward
        context carries ``response_ids``, ``context_ids`` (the tokens before the response), ``ref_logprobs``
        (per-token reference log-probs, or None with ``reference_logprobs=False``) and ``stopped``.
    :param max_new_tokens: response length limit (per agent turn in multi-turn mode).
    :param max_prompt_tokens: prompt length limit, chat formatting included.
    :param use_chat_template: format prompts with the tokenizer's chat template; default on when it has one.
    :param stop_token_ids: tokens that end the response; default the EOS token(s).
    :param truncate_prompt: ``None`` (too-long prompts raise), ``"left"`` or ``"right"`` (cut that side).
    :param multi_turn: ``None`` for single-turn episodes, or :class:`MultiTurn` settings (or a dict of them).
    :param allowed_token_ids: restrict the actions to these token ids (other ids raise); ``action_masks()``
        then marks them, for maskable policies. ``None``: every token is allowed.
    :param reference_logprobs: score every token under the env's LM as it is taken (``info["ref_logprob"]``
        and the reward context's ``ref_logprobs``). With ``False`` the LM does not run during steps at all
        (the env only keeps tokens): cheaper when the agent scores the reference itself, as ``LMPPO`` does
        in one batched forward per episode; rewards that need reference log-probs score the finished response.
    :param device: device of the LM; default CUDA when available.
    :param dtype: dtype of the LM when loaded here; default float32.
    :param render_mode: ``"ansi"`` (``render()`` returns text) or ``"human"`` (prints it).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        model: Any = "default",
        tokenizer: Any = None,
        prompts: Any = None,
        reward: Any = None,
        max_new_tokens: int = 48,
        max_prompt_tokens: int = 128,
        use_chat_template: bool | None = None,
        stop_token_ids: Any = None,
        truncate_prompt: str | None = None,
        multi_turn: MultiTurn | dict | None = None,
        allowed_token_ids: Any = None,
        reference_logprobs: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; expected one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.core = build_episodes(
            1, model=model, tokenizer=tokenizer, prompts=prompts, reward=reward, max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens, use_chat_template=use_chat_template, stop_token_ids=stop_token_ids,
            truncate_prompt=truncate_prompt, multi_turn=multi_turn, allowed_token_ids=allowed_token_ids,
            reference_logprobs=reference_logprobs, device=device, dtype=dtype,
        )
        self.observation_space = observation_space(self.core.vocab_size, self.core.obs_length)
        self.action_space = spaces.Discrete(self.core.vocab_size)
        self._episode_over: bool | None = None  # None: never reset

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: draw a prompt with ``self.np_random`` (or take ``options["prompt"]``)."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected keys among {sorted(RESET_OPTIONS)}")
        info = self.core.reset_rows([0], [self.np_random], [options.get("prompt")])[0]
        self._episode_over = False
        return self._observation(), info

    def step(self, action):
        """Append one token; see the class docstring for rewards, flags and ``info``."""
        if self._episode_over is None:
            raise RuntimeError("call reset() before step()")
        if self._episode_over:
            raise RuntimeError("the episode is over (terminated or truncated); call reset() before stepping again")
        token = validate_action(action, self.core.vocab_size, self.core.allowed)
        actions = torch.tensor([token], device=self.core.device)
        result = self.core.step(actions, torch.ones(1, dtype=torch.bool, device=self.core.device))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])
        self._episode_over = terminated or truncated
        info = {"ref_logprob": float(result.ref_logprob[0])} if self.core.reference_logprobs else {}
        info.update(result.infos[0])
        if self.render_mode == "human":
            self.render()
        return self._observation(), float(result.reward[0]), terminated, truncated, info

    def next_token_logprobs(self) -> torch.Tensor:
        """log π_ref(· | observation) over the action space, on the env's device (valid until the next step)."""
        if not self.core.reference_logprobs:
            raise RuntimeError("this env was made with reference_logprobs=False: its LM does not run during steps")
        return self.core.batch.next_logprobs[0]

    def render(self):
        """``"ansi"``: return the dialogue so far as text; ``"human"``: print it."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' or 'human'")
            return None
        text = self._render_text()
        if self.render_mode == "human":
            print(text)
            return None
        return text

    def _render_text(self) -> str:
        if self._episode_over is None:
            return ""
        return self.core.dialogue_text(0, with_partial_turn=not self._episode_over)

    def action_masks(self) -> np.ndarray:
        """Boolean (V,) mask of the allowed tokens (all True without ``allowed_token_ids``), for MaskablePPO."""
        return allowed_or_all(self.core.allowed, self.core.vocab_size).copy()

    def _observation(self) -> dict[str, np.ndarray]:
        ids, mask = self.core.observation()
        return {"input_ids": ids[0].cpu().numpy(), "attention_mask": mask[0].cpu().numpy()}

    def close(self):
        """Free the LM and its cache (device memory); safe to call twice."""
        if getattr(self, "core", None) is not None:
            self.core = None
            if torch.cuda is not None and torch.cuda.is_available():  # None during interpreter shutdown
                torch.cuda.empty_cache()


def observation_space(vocab_size: int, length: int) -> spaces.Dict:
    """The observation space of one episode: left-padded token ids and their attention mask."""
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        }
    )


def allowed_or_all(allowed: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """The allowed-token mask, or an all-True mask when every token is allowed."""
    return allowed if allowed is not None else np.ones(vocab_size, dtype=bool)


def validate_action(action, vocab_size: int, allowed: np.ndarray | None = None) -> int:
    """A token id from a Python int, a numpy integer scalar or a 0-d integer array; else a clear error."""
    if isinstance(action, np.ndarray) and action.ndim == 0:
        action = action[()]
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
        raise TypeError(
            f"action {action!r:.60} of type {type(action).__name__} is not a token id; "
            f"expected an int (Python, numpy scalar or 0-d array) in [0, {vocab_size})"
        )
    if not 0 <= int(action) < vocab_size:
        raise ValueError(f"action {int(action)} is outside the action space; expected a token id in [0, {vocab_size})")
    if allowed is not None and not allowed[int(action)]:
        raise ValueError(
            f"action {int(action)} is not among the {int(allowed.sum())} allowed_token_ids; see action_masks()"
        )
    return int(action)


def build_episodes(
    num_rows: int, *, model, tokenizer, prompts, reward, max_new_tokens, max_prompt_tokens, use_chat_template,
    stop_token_ids, truncate_prompt, multi_turn, allowed_token_ids=None, reference_logprobs=True, device=None,
    dtype=None,
) -> TokenEpisodes:
    """Resolve the env keywords (load the model, the prompts, the reward) into a :class:`TokenEpisodes`."""
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if truncate_prompt not in (None, "left", "right"):
        raise ValueError(f"truncate_prompt={truncate_prompt!r}; expected None, 'left' or 'right'")
    model, tokenizer = resolve_model(model, tokenizer, device, dtype)
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    elif use_chat_template and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    if isinstance(multi_turn, dict):
        multi_turn = MultiTurn(**multi_turn)
    if multi_turn is not None and multi_turn.context_tokens <= max_prompt_tokens:
        raise ValueError(
            f"multi_turn.context_tokens={multi_turn.context_tokens} leaves no room after "
            f"max_prompt_tokens={max_prompt_tokens}"
        )
    reward = as_reward(reward) if reward is not None else default_reward()
    reward.bind(model, tokenizer)
    return TokenEpisodes(
        model, tokenizer, num_rows, load_prompts(prompts), reward,
        max_new_tokens=int(max_new_tokens), max_prompt_tokens=int(max_prompt_tokens),
        use_chat_template=use_chat_template, stop_token_ids=resolve_stop_tokens(tokenizer, model, stop_token_ids),
        truncate_prompt=truncate_prompt, multi_turn=multi_turn, allowed_token_ids=allowed_token_ids,
        reference_logprobs=bool(reference_logprobs),
    )


def resolve_model(model, tokenizer, device, dtype):
    """A loaded ``(model, tokenizer)`` pair in eval mode from a name/path or an already loaded model."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("pass tokenizer= only with an already loaded model; a model name brings its own")
        model, tokenizer = load_model(model, device=device, dtype=dtype)
        model.requires_grad_(False)
        return model, tokenizer
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model={model!r:.80} is neither a model name/path nor a loaded causal LM")
    if tokenizer is None:
        source = getattr(model, "name_or_path", "")
        if not source:
            raise ValueError("a loaded model needs tokenizer=...; it has no name_or_path to load one from")
        tokenizer = load_tokenizer(source)
    ensure_pad_token(tokenizer)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer
