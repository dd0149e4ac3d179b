"""``LanguageModelVectorEnv``: N episodes stepped together in one batched, KV-cached forward."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from lm_gym.config import EnvConfig
from lm_gym.env import EpisodesOwner, allowed_or_all, observation_space
from lm_gym.episode_rules import TokenEpisodes, step_infos

RESET_OPTIONS = {"prompt", "prompts", "reset_mask"}


class LanguageModelVectorEnv(EpisodesOwner, VectorEnv):
    """N language-model episodes on the device, one token per row per step, one forward per step.

    :param num_envs: number of episodes stepped together.
    :param config: an :class:`lm_gym.EnvConfig`; keyword ``settings`` (its fields: ``model``, ``prompts``,
        ``reward``, ``max_new_tokens``, ...) replace its fields.
    :param autoreset_mode: ``AutoresetMode.NEXT_STEP`` (default: a finished row is reset on the next step,
        whose action for it is ignored), ``SAME_STEP`` (reset at once; the final observation and info go to
        ``infos["final_obs"]`` / ``infos["final_info"]``) or ``DISABLED`` (reset finished rows with
        ``reset(options={"reset_mask": mask})``). Strings with the enum's value or name work too.
    :param output: ``"numpy"`` (arrays on the host) or ``"torch"`` (observations, rewards and flags as
        tensors on the env's device, without a host copy).
    :param render_mode: ``"ansi"`` (``render()`` returns each row's text) or None.
    :param group_size: G > 1 gives each prompt to a group of G consecutive rows (rows ``kG ... kG + G - 1``),
        for group-relative agents (GRPO, RLOO): the rows of a group share the prompt, which the group's first
        row draws, and restart together once all of them have ended. A row whose episode ended while others
        of its group still play *waits*: its steps take no action, give reward 0, never end and carry
        ``info["waiting"] = True``; in ``SAME_STEP`` its observation stays the final one until the group
        restarts, in ``NEXT_STEP`` the group's rows are reset on the step after its last row ended, and in
        ``DISABLED`` ``reset_mask`` must select whole groups. The steps of a group's episodes carry
        ``info["group"]``, an id that no other group episode of this env shares. ``num_envs`` must be a
        multiple of G.

    Row i is seeded with ``seed + i``, so for the same seeds and actions it plays exactly the episodes
    of N single :class:`LanguageModelEnv` in a :class:`gymnasium.vector.SyncVectorEnv` (with G = 1).
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        config: EnvConfig | None = None,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        output: str = "numpy",
        render_mode: str | None = None,
        group_size: int = 1,
        **settings: Any,
    ):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if output not in ("numpy", "torch"):
            raise ValueError(f"output={output!r}; expected 'numpy' or 'torch'")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}; expected 'ansi' or None")
        self.autoreset_mode = _autoreset_mode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.num_envs, self.output, self.render_mode = int(num_envs), output, render_mode
        self.group_size = _group_size(group_size, self.num_envs)
        self.config = EnvConfig.of(config, **settings)
        self.episodes = TokenEpisodes.from_config(self.config, self.num_envs)
        self.single_observation_space = observation_space(self.episodes.vocab_size, self.episodes.obs_length,
                                                          self.config.multi_turn is not None)
        self.single_action_space = spaces.Discrete(self.episodes.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._needs_reset = np.ones(self.num_envs, dtype=bool)
        self._waiting = np.zeros(self.num_envs, dtype=bool)  # ended, while others of the group play on
        self._started = np.zeros(self.num_envs, dtype=bool)
        self._group_ids = np.full(self.num_envs // self.group_size, -1, dtype=np.int64)
        self._groups_started = 0

    # --- reset ---------------------------------------------------------------------------------------

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        """Reset all rows (or those in ``options["reset_mask"]``); row i is seeded with ``seed + i``.

        ``options["prompt"]`` forces one prompt on every reset row; ``options["prompts"]`` gives one per row.
        """
        obs, row_infos = self.reset_with_row_infos(seed=seed, options=options)
        return obs, self._vector_infos(row_infos)

    def reset_with_row_infos(self, *, seed=None, options: dict | None = None) -> tuple[Any, list[dict]]:
        """:meth:`reset`, with one info dict per row instead of Gymnasium's batched infos."""
        options = dict(options or {})
        unknown = set(options) - RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected keys among {sorted(RESET_OPTIONS)}")
        mask = _reset_mask(options.get("reset_mask"), self.num_envs)
        _check_whole_groups(mask, self.group_size)
        seeds = _row_seeds(seed, self.num_envs)
        for row in np.flatnonzero(mask):
            if seeds[row] is not None or self._rngs[row] is None:
                self._rngs[row] = seeding.np_random(seeds[row])[0]
        prompts = _row_prompts(options, self.num_envs)
        row_infos: list[dict] = [{} for _ in range(self.num_envs)]
        self._reset_rows(np.flatnonzero(mask), prompts)
        return self._observation(), row_infos

    def _reset_rows(self, rows: np.ndarray, prompts: list) -> None:
        """Start new episodes in ``rows``, whole groups (one batched prefill; reset infos are empty). A group
        without a given prompt takes the one its first row draws."""
        row_list = rows.tolist()
        if self.group_size > 1:
            prompts = self._group_prompts(row_list, list(prompts))
        self.episodes.reset_rows(row_list, [self._rngs[r] for r in row_list], [prompts[r] for r in row_list])
        self._needs_reset[rows] = False
        self._waiting[rows] = False
        self._started[rows] = True

    def _group_prompts(self, rows: list[int], prompts: list) -> list:
        """``prompts`` with each restarting group's rows on one prompt (given, or drawn by its first row), and
        a new id for each of those groups."""
        for leader in rows[:: self.group_size]:
            group = range(leader, leader + self.group_size)
            if len({repr(prompts[row]) for row in group}) > 1:
                raise ValueError(f"rows {group.start}..{group.stop - 1} form a group (group_size={self.group_size}) "
                                 "and share one prompt; the reset options gave them different ones")
            prompt = self.episodes.prompts(self._rngs[leader]) if prompts[leader] is None else prompts[leader]
            prompts[group.start : group.stop] = [prompt] * self.group_size
            self._group_ids[leader // self.group_size] = self._groups_started
            self._groups_started += 1
        return prompts

    # --- step ----------------------------------------------------------------------------------------

    def step(self, actions):
        """Step every row; see the class docstring for the autoreset modes."""
        obs, rewards, terminated, truncated, row_infos = self.step_with_row_infos(actions)
        return obs, rewards, terminated, truncated, self._vector_infos(row_infos)

    def step_with_row_infos(self, actions) -> tuple[Any, Any, Any, Any, list[dict]]:
        """:meth:`step`, with one info dict per row instead of Gymnasium's batched infos."""
        if not self._started.all():
            raise RuntimeError("call reset() before step()")
        tokens = self._validate_actions(actions)
        resetting, waiting = self._needs_reset.copy(), self._waiting.copy()
        if self.autoreset_mode == AutoresetMode.DISABLED and resetting.any():
            raise RuntimeError(
                f"rows {np.flatnonzero(resetting).tolist()} have finished episodes; with autoreset DISABLED "
                "reset them first with reset(options={'reset_mask': mask})"
            )
        playing = ~(resetting | waiting)
        result = self.episodes.step(tokens, torch.as_tensor(playing, device=self.episodes.device))
        ended = (result.terminated | result.truncated).cpu().numpy()
        infos = step_infos(result, self.episodes.reference_logprobs)
        row_infos = [infos[row] if playing[row] else {} for row in range(self.num_envs)]
        for row in np.flatnonzero(playing if self.group_size > 1 else []):
            row_infos[row]["group"] = int(self._group_ids[row // self.group_size])
        for row in np.flatnonzero(waiting):
            row_infos[row] = {"waiting": True}
        no_prompts = [None] * self.num_envs
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and resetting.any():
            self._reset_rows(np.flatnonzero(resetting), no_prompts)
        over = self._groups_over(waiting | ended)  # rows of the groups all of whose rows have ended
        self._waiting = (waiting | ended) & ~over
        if self.autoreset_mode == AutoresetMode.SAME_STEP and ended.any():
            final_obs = self._observation(numpy=True)
            for row in np.flatnonzero(ended):
                single_obs = {key: value[row] for key, value in final_obs.items()}
                row_infos[row] = {"final_obs": single_obs, "final_info": row_infos[row]}
            if over.any():
                self._reset_rows(np.flatnonzero(over), no_prompts)
        else:
            self._needs_reset = over
        flags = self._flags(result.reward.double(), result.terminated, result.truncated)
        return self._observation(), *flags, row_infos

    def _groups_over(self, ended: np.ndarray) -> np.ndarray:
        """(N,) True on the rows of every group whose rows have all ``ended``."""
        groups = ended.reshape(-1, self.group_size).all(axis=1)
        return np.repeat(groups, self.group_size)

    def _vector_infos(self, row_infos: list[dict]) -> dict:
        infos: dict = {}
        for row, info in enumerate(row_infos):
            infos = self._add_info(infos, info, row)
        return infos

    def _flags(self, rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor):
        if self.output == "torch":
            return rewards.float(), terminated, truncated
        return rewards.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy()

    def _validate_actions(self, actions) -> torch.Tensor:
        """(N,) integer token ids (array, list or tensor) in range and allowed; else a clear error."""
        if isinstance(actions, torch.Tensor):
            array = actions.detach().cpu().numpy()
        else:
            array = np.asarray(actions)
        if array.shape != (self.num_envs,) or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"actions must be {self.num_envs} integer token ids (shape ({self.num_envs},)), "
                f"got shape {array.shape} and dtype {array.dtype}"
            )
        vocab = self.episodes.vocab_size
        bad = np.flatnonzero((array < 0) | (array >= vocab))
        if len(bad):
            raise ValueError(f"action {array[bad[0]]} of row {bad[0]} is outside the action space [0, {vocab})")
        allowed = self.episodes.allowed
        if allowed is not None:
            stepped = ~(self._needs_reset | self._waiting)
            bad = np.flatnonzero(stepped & ~allowed[array])
            if len(bad):
                raise ValueError(f"action {array[bad[0]]} of row {bad[0]} is not among the allowed_token_ids")
        if isinstance(actions, torch.Tensor) and actions.device == self.episodes.device:
            return actions.long()
        return torch.as_tensor(array, dtype=torch.long, device=self.episodes.device)

    def _observation(self, numpy: bool | None = None):
        observation = self.episodes.observation()
        if (self.output == "torch") if numpy is None else not numpy:
            return observation
        return {key: value.cpu().numpy() for key, value in observation.items()}

    # --- extras --------------------------------------------------------------------------------------

    def action_masks(self) -> np.ndarray:
        """Boolean (N, V) masks of the allowed tokens (all True without ``allowed_token_ids``)."""
        return np.tile(allowed_or_all(self.episodes.allowed, self.episodes.vocab_size), (self.num_envs, 1))

    def render(self) -> tuple[str, ...] | None:
        """With ``render_mode="ansi"``: each row's dialogue so far as text."""
        if self.render_mode != "ansi":
            return None
        finished = self._needs_reset | self._waiting
        return tuple(self.episodes.dialogue_text(row, with_partial_turn=not finished[row])
                     for row in range(self.num_envs))

    def close_extras(self, **kwargs) -> None:
        """Free the LM and its cache and close the other party."""
        episodes = getattr(self, "episodes", None)  # None, or never made when the settings were refused
        if episodes is not None and episodes.party is not None:
            episodes.party.close()
        self.episodes = None
        cuda = getattr(torch, "cuda", None)  # torch's globals are None during interpreter shutdown
        if cuda is not None and cuda.is_available():
            cuda.empty_cache()


def _autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    if isinstance(mode, AutoresetMode):
        return mode
    for candidate in AutoresetMode:
        if str(mode).lower() in (candidate.value.lower(), candidate.name.lower()):
            return candidate
    raise ValueError(f"autoreset_mode={mode!r}; expected one of {[m.name for m in AutoresetMode]}")


def _group_size(group_size, num_envs: int) -> int:
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if num_envs % group_size:
        raise ValueError(f"num_envs={num_envs} is not a multiple of group_size={group_size}: every group of "
                         f"{group_size} consecutive rows shares one prompt")
    return int(group_size)


def _check_whole_groups(mask: np.ndarray, group_size: int) -> None:
    groups = mask.reshape(-1, group_size)
    partial = np.flatnonzero(groups.any(axis=1) & ~groups.all(axis=1))
    if len(partial):
        first = int(partial[0]) * group_size
        raise ValueError(f"options['reset_mask'] selects part of the group of rows {first}..{first + group_size - 1} "
                         f"(group_size={group_size}); groups restart together: select all of their rows or none")


def _reset_mask(mask, num_envs: int) -> np.ndarray:
    if mask is None:
        return np.ones(num_envs, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != (num_envs,) or mask.dtype != np.bool_:
        raise ValueError(f"options['reset_mask'] must be a bool array of shape ({num_envs},), got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("options['reset_mask'] selects no row; set at least one True")
    return mask


def _row_seeds(seed, num_envs: int) -> list[int | None]:
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num_envs)]
    seeds = list(seed)
    if len(seeds) != num_envs:
        raise ValueError(f"seed list has {len(seeds)} entries; expected num_envs={num_envs}")
    return seeds


def _row_prompts(options: dict, num_envs: int) -> list:
    if "prompt" in options and "prompts" in options:
        raise ValueError("give options['prompt'] (all rows) or options['prompts'] (one per row), not both")
    if "prompts" in options:
        prompts = list(options["prompts"])
        if len(prompts) != num_envs:
            raise ValueError(f"options['prompts'] has {len(prompts)} entries; expected num_envs={num_envs}")
        return prompts
    return [options.get("prompt")] * num_envs
