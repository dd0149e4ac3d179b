"""``LMPPO``: stable-baselines3 PPO specialised for token episodes.

Same API as SB3's ``PPO`` (``learn``, ``save``, ``load``, ``predict``), same clipped objective, but:

- rollouts store each episode once as :class:`agents.segments.Segment` (context, tokens, log-probs,
  values, reference log-probs, rewards), not one padded observation per token, in a
  :class:`agents.segments.Rollout` that ``train()`` reads;
- ``train()`` evaluates every token of a segment in one forward of the Transformer;
- the PPO-for-LM recipe: token-level KL penalty to the reference in the reward (r_t = -β·(log π - log π_ref),
  plus the env's sequence reward on the last token), GAE with γ = 1, λ = 0.95, value bootstrap on
  truncation only, masked advantage whitening, running reward normalisation with clipping, policy and
  value clipping 0.2, global grad-norm clip 1.0, no entropy bonus, dropout off;
- data-parallel under ``torch.distributed`` (launched with ``torchrun``): when a process group is running,
  each rank steps its own env rows, gradients are averaged by ``DistributedDataParallel``, and the reward
  normalisation, the KL controller and the logs use the statistics of all ranks (:mod:`agents.distributed`).
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import explained_variance
from torch.nn.parallel import DistributedDataParallel

from agents import distributed
from agents.actor_critic import token_batch
from agents.advantages import KLController, masked_whiten
from agents.policy import TransformerActorCriticPolicy
from agents.ptx import PretrainingBatches
from agents.rollout_cache import RolloutCache
from agents.segments import Rollout, SegmentBatch, SegmentCollector
from lm_gym.episode_rules import TURN_ENDED_KEY
from lm_gym.padding import SHAPE_MULTIPLE, pad_left, round_up, trim_left
from lm_gym.precision import autocast_off
from lm_gym.rewards.combine import RunningMeanStd
from lm_gym.sampling import sample_tokens
from lm_gym.reference import ReferenceModel


class LMPPO(PPO):
    """PPO for language-model token episodes (see the module docstring).

    Takes SB3 ``PPO``'s keywords, with LM defaults, plus:

    :param kl_coef: β of the per-token KL penalty to the reference model (:attr:`reference`, made once): the
        env's reference (``env.reference``) when it has one, else the policy's LM with its LoRA adapters off,
        else a frozen copy of the initial LM. Tokens come scored by the env (``info["ref_logprob"]``) or, when
        it made them with ``reference_logprobs=False``, are scored by the reference once per episode.
    :param kl_target: if set, adapt β towards this mean KL per episode (proportional controller).
    :param kl_horizon: horizon (in tokens) of the adaptive controller.
    :param normalize_reward: standardise the env's rewards with running statistics before the KL term.
    :param reward_clip: clip normalised rewards to ±this value.
    :param batch_size: tokens per minibatch (whole segments are kept together), over all ranks when
        data-parallel.
    :param episodes_per_row: if set, a rollout ends as soon as every env row has ended this many episodes (at
        most ``n_steps`` steps) and keeps only those: ``episodes_per_row * num_envs`` whole episodes however
        short they are (a row that ended its share early plays on while the others finish, and what it plays
        then is dropped). With prompt groups and 1: ``num_envs / G`` prompts of G episodes each, the batch
        TRL's and verl's GRPO sample. None (default): SB3's rollout of ``n_steps`` steps per row, in which a
        row starts its next episode as soon as one ends, and every episode that ends trains.
    :param minibatches: if set, each epoch takes this many minibatches (optimizer steps) of equal numbers of
        segments instead of ``batch_size`` tokens each, as TRL's ``steps_per_generation`` counts them.
    :param micro_batch_tokens: the most positions (context, response and padding) one training forward takes:
        a minibatch that holds more is split into micro-batches of segments of similar lengths, whose
        gradients accumulate into the minibatch's one optimizer step. The update is the minibatch's (the same
        loss, advantage whitening and clipping), and the activations held for backward are a micro-batch's,
        about 1 MB per position on the default model. None: one forward per minibatch.
    :param critic_warmup: rollouts at the start whose updates train only the critic (the actor is frozen),
        so that the first policy updates see advantages from a fitted value function.
    :param ptx_coef: weight of the pretraining loss (PPO-ptx) added to every update; needs ``ptx_texts``.
    :param ptx_texts: text for the pretraining loss, packed into blocks of ``ptx_block_tokens`` tokens.
    :param ptx_batch_size: blocks per update.
    :param watchdog_kl: warn (a sign of collapse) when the mean KL per segment exceeds this many nats, or
        when the mean response length leaves [0.5x, 2x] of the first rollout's.
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` for the policy (its ``policy_kwargs["precision"]``,
        see :mod:`lm_gym.precision`): rollouts sample from a bf16 copy of the weights (made once per rollout),
        updates run under bf16 autocast on float32 master weights and optimizer states; log-probs, KL,
        advantages, value targets and losses are float32 in every precision. Default: the policy's
        (``$LM_GYM_PRECISION``, else ``"auto"``).
    :param recompute_logprobs: before the first epoch, take PPO's old log-probs and the values from the
        training forward (one forward per segment, no gradients), so that PPO's ratio starts at exactly 1;
        the KL penalty keeps the sampled log-probs. In bf16 the rollout's decode and the training forward
        round differently (mean |Δ log p| about 0.03 on the default model, ratios from 0.8 to 1.3 before any
        update: ``benchmarks/precision_ppo.py``), which would clip and bias the first updates. Default: on in
        bf16, off in float32 (where the two agree to 1e-5).
    """

    def __init__(
        self, policy=TransformerActorCriticPolicy, env=None, learning_rate=1e-5, n_steps: int = 64,
        batch_size: int = 256, n_epochs: int = 4, gamma: float = 1.0, gae_lambda: float = 0.95,
        clip_range: float = 0.2, clip_range_vf: float | None = 0.2, ent_coef: float = 0.0, vf_coef: float = 0.5,
        max_grad_norm: float = 1.0, kl_coef: float = 0.05, kl_target: float | None = None,
        kl_horizon: int = 10_000, normalize_reward: bool = True, reward_clip: float = 5.0, critic_warmup: int = 0,
        ptx_coef: float = 0.0, ptx_texts=None, ptx_batch_size: int = 4, ptx_block_tokens: int = 256,
        watchdog_kl: float = 10.0, precision=None, recompute_logprobs: bool | None = None,
        micro_batch_tokens: int | None = 512, minibatches: int | None = None, episodes_per_row: int | None = None,
        **kwargs,
    ):
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens={micro_batch_tokens}: expected a positive count of positions or None")
        if minibatches is not None and minibatches < 1:
            raise ValueError(f"minibatches={minibatches}: expected a positive number of optimizer steps per epoch or None")
        if episodes_per_row is not None and episodes_per_row < 1:
            raise ValueError(f"episodes_per_row={episodes_per_row}: expected a positive number of episodes or None")
        if ptx_coef and not ptx_texts:
            raise ValueError(f"ptx_coef={ptx_coef} needs ptx_texts (the text of the pretraining loss)")
        self.kl_controller = KLController(kl_coef, kl_target, kl_horizon)
        self.watchdog_kl, self.initial_length = watchdog_kl, None
        self.normalize_reward, self.reward_clip = normalize_reward, reward_clip
        self.reward_stats = RunningMeanStd()
        self.critic_warmup, self.trained_rollouts = critic_warmup, 0
        self.ptx_coef, self.ptx_texts = ptx_coef, ptx_texts
        self.ptx_batch_size, self.ptx_block_tokens = ptx_batch_size, ptx_block_tokens
        self.recompute_logprobs, self.micro_batch_tokens = recompute_logprobs, micro_batch_tokens
        self.minibatches, self.episodes_per_row = minibatches, episodes_per_row
        if precision is not None:
            kwargs["policy_kwargs"] = with_precision(kwargs.get("policy_kwargs"), precision)
        with warnings.catch_warnings():  # SB3 checks batch_size against n_steps * n_envs; ours counts tokens
            warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
            super().__init__(
                policy, env, learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
                gamma=gamma, gae_lambda=gae_lambda, clip_range=clip_range, clip_range_vf=clip_range_vf,
                ent_coef=ent_coef, vf_coef=vf_coef, max_grad_norm=max_grad_norm, **kwargs,
            )

    def _setup_model(self) -> None:
        super()._setup_model()
        self.rollout_buffer = None  # replaced by segments: nothing is stored per padded observation
        self.rollout = Rollout()  # what collect_rollouts leaves for train
        self.reference = self._make_reference()
        self.ptx = None
        self.data_parallel = None
        if distributed.active():  # DDP's constructor also gives every rank rank 0's weights
            self._wrap_data_parallel(actor=self.critic_warmup == 0)
        if self.ptx_coef:
            self.ptx = PretrainingBatches(self.ptx_texts, self.actor_critic.tokenizer, self.ptx_block_tokens,
                                          self.ptx_batch_size)

    def save(self, path, exclude=None, include=None) -> None:
        """SB3's ``save``; models given loaded in ``policy_kwargs`` are stored by name, not pickled.

        ``LMPPO.load`` rebuilds them from their ``name_or_path``; pass ``custom_objects={"policy_kwargs": ...}``
        to hand it loaded models instead (for example the env's LM, to share it with a LoRA policy again).
        """
        kwargs = self.policy_kwargs
        self.policy_kwargs = portable_policy_kwargs(kwargs)
        try:
            super().save(path, exclude, include)
        finally:
            self.policy_kwargs = kwargs

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "rollout", "reference", "ptx", "data_parallel"]

    @property
    def actor_critic(self):
        """The policy's :class:`agents.actor_critic.TransformerActorCritic` (its LM, tokenizer and value head)."""
        return self.policy.actor_critic

    @property
    def kl_coef(self) -> float:
        """The current β of the per-token KL penalty (:attr:`kl_controller` owns it)."""
        return self.kl_controller.coef

    def training_state(self) -> dict:
        """A copy of everything an exact resume needs: the policy's weights and optimizer, the step and update
        counters, the reward statistics, the KL controller, the critic warm-up count and the RNG states."""
        return copy.deepcopy({
            "policy": self.policy.state_dict(), "optimizer": self.policy.optimizer.state_dict(),
            "num_timesteps": self.num_timesteps, "n_updates": self._n_updates, "reward_stats": self.reward_stats,
            "kl_controller": self.kl_controller, "trained_rollouts": self.trained_rollouts,
            "initial_length": self.initial_length, "rng": rng_states(),
        })

    def load_training_state(self, state: dict) -> None:
        """Return to a :meth:`training_state` (the rollout caches are dropped with the old weights)."""
        state = copy.deepcopy(state)
        self.policy.load_state_dict(state["policy"])
        self.policy.optimizer.load_state_dict(state["optimizer"])
        self.num_timesteps, self._n_updates = state["num_timesteps"], state["n_updates"]
        self.reward_stats, self.kl_controller = state["reward_stats"], state["kl_controller"]
        self.trained_rollouts, self.initial_length = state["trained_rollouts"], state["initial_length"]
        set_rng_states(state["rng"])

    def reset_episodes(self) -> None:
        """Reset the env now, so that the next rollout starts fresh episodes (not the ones the last cut)."""
        self._last_obs = self.env.reset()
        self._last_episode_starts = np.ones((self.env.num_envs,), dtype=bool)
        self.fresh_episodes = True  # until a rollout plays them

    # --- rollouts ------------------------------------------------------------------------------------

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        """Run ``n_rollout_steps`` steps of every env row (fewer with ``episodes_per_row``) and store the tokens as
        segments."""
        self.policy.set_training_mode(False)
        collector, cache = SegmentCollector(env.num_envs, self.episodes_per_row), RolloutCache()
        obs = self._last_obs
        allowed = self._allowed_tokens(env)
        for row in range(env.num_envs):
            collector.begin(row, _context(obs, row))
        started, steps = time.perf_counter(), 0
        callback.on_rollout_start()
        with self.actor_critic.precision.autocast(self.device):  # bootstrap values' forwards cast the weights once
            while steps < n_rollout_steps and not collector.complete:
                with torch.no_grad():
                    ids, mask = token_batch(obs["input_ids"], obs["attention_mask"], self.device)
                    logits, values = self.actor_critic.act(ids, mask, cache, values=not self._deferred_values)
                    values = torch.full((len(logits),), float("nan")) if values is None else values
                    actions, log_probs = sample_tokens(logits, allowed=allowed)
                actions = actions.cpu().numpy()
                with autocast_off(self.device):  # the env and its reward compute in their own precision
                    new_obs, rewards, dones, infos = env.step(actions)
                    cache.reset(np.flatnonzero(dones))  # those rows start new episodes
                    self.num_timesteps += env.num_envs * distributed.world_size()  # env steps of all ranks
                    callback.update_locals(locals())
                    if not callback.on_step():
                        return False
                    self._record(collector, obs, new_obs, actions, values, log_probs, rewards, dones, infos)
                obs, steps = new_obs, steps + 1
        cache.reset()  # the acting copy and its KV caches go now, not when the callback's locals next change
        open_rows = collector.open_rows()
        last_values = self._values_of([{key: value[row] for key, value in obs.items()} for row in open_rows])
        for row, value in zip(open_rows, last_values):
            collector.close(row, value)
        self._last_obs = obs
        segments = collector.finished
        if self._deferred_values:
            self._fill_values(segments)
        self._fill_reference_logprobs(segments)
        self.rollout = Rollout(segments, allowed, time.perf_counter() - started)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _record(self, collector, obs, new_obs, actions, values, log_probs, rewards, dones, infos) -> None:
        """Add the step's tokens to the open segments; close the ended ones and begin the next. A row that waits
        for its prompt group (``info["waiting"]``) took no action: its next segment begins from the context
        it has when the wait ends."""
        for row, info in enumerate(infos):
            if info.get("waiting"):
                collector.begin(row, _context(new_obs, row))
                continue
            collector.add(row, int(actions[row]), float(log_probs[row]), float(values[row]),
                          info.get("ref_logprob", float("nan")), float(rewards[row]), info.get(TURN_ENDED_KEY, False))
            if not dones[row]:
                _record_inserts(collector, row, new_obs)
        ended = np.flatnonzero(dones).tolist()
        truncated = [row for row in ended if infos[row].get("TimeLimit.truncated", False)]
        bootstrap = dict(zip(truncated, self._values_of([infos[row]["terminal_observation"] for row in truncated])))
        for row in ended:
            collector.close(row, bootstrap.get(row, 0.0), terminated=row not in bootstrap, ended=True,
                            reward_components=infos[row].get("reward_components"), group=infos[row].get("group"))
            collector.begin(row, _context(new_obs, row))

    def _make_reference(self) -> ReferenceModel:
        """The reference model: the env's, else the policy's LM with its LoRA adapters off, else a frozen copy
        of the policy's LM as it is now (before any update: the initial policy)."""
        reference = env_reference(self.env) if self.env is not None else None
        if reference is not None:
            return reference
        lm, tokenizer = self.actor_critic.lm, self.actor_critic.tokenizer
        if hasattr(lm, "peft_config"):
            return ReferenceModel(lm, tokenizer)
        return ReferenceModel.frozen_copy(lm, tokenizer, self.actor_critic.precision.dtype)

    def _fill_reference_logprobs(self, segments: list) -> None:
        """Where the env gave no ``ref_logprob``, score the segments with the reference: one forward each."""
        missing = [s for s in segments if any(np.isnan(s.ref_logprobs))]
        if not missing:
            return
        streams = [s.sequence()[len(s.context):] for s in missing]
        scored = self.reference.continuation_logprobs([s.context for s in missing], streams)
        for segment, logprobs in zip(missing, scored):
            segment.ref_logprobs = logprobs[segment.offsets()].tolist()  # the agent's tokens, not inserted ones

    def _allowed_tokens(self, env) -> torch.Tensor | None:
        """The env's allowed-token mask (V,) when it restricts the actions, else None."""
        if not env.has_attr("action_masks"):
            return None
        masks = np.stack(env.env_method("action_masks"))
        if masks.all():
            return None
        if not (masks == masks[0]).all():
            raise ValueError("LMPPO supports one allowed-token set shared by all env rows")
        return torch.as_tensor(masks[0], device=self.device)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False, action_masks=None):
        """Like SB3's ``predict``; ``action_masks`` (like MaskablePPO's) restricts the tokens."""
        if action_masks is None:
            return super().predict(observation, state, episode_start, deterministic)
        self.policy.set_training_mode(False)
        obs, batched = self.policy.obs_to_tensor(observation)  # one env's observation gets a batch axis
        allowed = torch.as_tensor(np.asarray(action_masks), device=self.device).bool()
        with torch.no_grad():
            logits, _ = self.actor_critic.act(*self.policy._tokens(obs), self.policy.rollout_cache, values=False)
            actions, _ = sample_tokens(logits, allowed=allowed.reshape(len(logits), -1), greedy=deterministic)
        actions = actions.cpu().numpy()
        return (actions if batched else actions[0]), state

    @property
    def _deferred_values(self) -> bool:
        """A separate critic is scored after the rollout, one forward per episode (:meth:`_fill_values`)."""
        return self.actor_critic.value_backbone is not None

    def _fill_values(self, all_segments: list, chunk: int = 16) -> None:
        """A separate critic's values for every state of every segment, and the bootstrap value after the last
        token where the segment was truncated: one forward of the critic per segment, in batches of ``chunk``."""
        pad = self.actor_critic.tokenizer.pad_token_id
        for start in range(0, len(all_segments), chunk):
            segments = all_segments[start : start + chunk]
            keep = max(s.stream_length for s in segments) + 1
            ids, mask = pad_left([s.sequence() for s in segments], pad, self.device)
            with torch.no_grad():
                values = self.actor_critic.evaluate(ids, mask, keep=keep, logits=False).values.cpu()
            for segment, row in zip(segments, values):
                states = row[keep - segment.stream_length - 1 :]  # before each id after the context, then after all
                segment.values = states[segment.offsets()].tolist()
                segment.next_value = 0.0 if segment.terminated else float(states[-1])

    def _values_of(self, observations: list[dict]) -> list[float]:
        """V(s) of single observations in one batched full forward (the rollout cache is left alone).

        NaN placeholders when a separate critic's values are filled after the rollout (:meth:`_fill_values`).
        """
        if not observations or self._deferred_values:
            return [float("nan")] * len(observations)
        ids, mask = (torch.as_tensor(np.stack([o[key] for o in observations]), device=self.device).long()
                     for key in ("input_ids", "attention_mask"))
        with torch.no_grad():
            return self.actor_critic.evaluate(*trim_left(ids, mask), logits=False).values[:, -1].tolist()

    # --- training ------------------------------------------------------------------------------------

    def train(self) -> None:
        """PPO epochs over the rollout's segments, each minibatch evaluated in one forward per segment."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        clip_range_vf = self.clip_range_vf(self._current_progress_remaining) if self.clip_range_vf else None
        data = self._training_batch()
        # nothing in the rollout carries a signal (for example every group uniform); data-parallel, the ranks
        # skip together, since DDP takes a backward on every rank
        if not distributed.every(data is not None):
            self.logger.record("train/skipped_update", 1)
            self._log_rollout()
            self.trained_rollouts += 1
            return
        epochs = [self._minibatches(data.mask) for _ in range(self.n_epochs)]
        self._fill_advantages(data, epochs[0])
        actor = self.trained_rollouts >= self.critic_warmup
        if self.data_parallel is not None and self.data_parallel.find_unused_parameters == actor:
            self._wrap_data_parallel(actor)  # the actor's parameters join (or leave) the gradients
        logs: dict[str, list[float]] = {}
        started = time.perf_counter()
        for minibatches in epochs:
            for rows in minibatches:
                stats = self._update(data, rows, clip_range, clip_range_vf, actor)
                for key, value in stats.items():
                    logs.setdefault(key, []).append(value)
        self._n_updates += self.n_epochs
        self.trained_rollouts += 1
        self.logger.record("train/actor_frozen", int(not actor))
        kl, tokens = self._log(data, logs, time.perf_counter() - started)
        self.kl_controller.update(kl, tokens)

    def _wrap_data_parallel(self, actor: bool) -> None:
        """Wrap the actor-critic in DDP; while the actor is frozen (critic warm-up) its parameters get no
        gradient, which DDP must be told of (and is best not told of otherwise: it costs a graph traversal)."""
        self.data_parallel = None  # the old wrapper's gradient hooks go with it
        self.data_parallel = DistributedDataParallel(
            self.policy.actor_critic, find_unused_parameters=not actor, forward_sync_buffers=False)

    def _training_batch(self) -> SegmentBatch | None:
        """The segments the update trains on, padded: all of the rollout's (None: nothing to train on)."""
        return self.rollout.batch(self.actor_critic.tokenizer.pad_token_id, self.device)

    def _prepare_batch(self) -> SegmentBatch:
        """The training batch with advantages from the (normalised) rewards and the KL penalty."""
        data = self._training_batch()
        self._fill_advantages(data)
        return data

    def _fill_advantages(self, data: SegmentBatch, minibatches: list[list[int]] | None = None) -> None:
        """Advantages and returns of ``data`` from the (normalised) rewards and the KL penalty, after the old
        log-probs and values are recomputed (see ``recompute_logprobs``) in the first epoch's ``minibatches``."""
        self._set_old_logprobs(data, minibatches)
        scores, scored = data.scores, data.scored.bool()
        scored_scores = distributed.gather(scores[scored])  # every rank's, for the same statistics everywhere
        if self.normalize_reward and len(scored_scores):
            self.reward_stats.update(scored_scores)
            normalised = self.reward_stats.normalise(scores).clamp(-self.reward_clip, self.reward_clip)
            scores = torch.where(scored, normalised, scores)
        data.compute_advantages(scores, self.kl_coef, self.gamma, self.gae_lambda)

    def _set_old_logprobs(self, data: SegmentBatch, minibatches: list[list[int]] | None = None) -> None:
        """PPO's old log-probs: the sampled ones, or the training forward's where ``recompute_logprobs`` says."""
        data.old_logprobs = data.logprobs
        recompute = self.recompute_logprobs
        if recompute or (recompute is None and self.actor_critic.precision.reduced):
            self._recompute_old(data, minibatches)

    @torch.no_grad()
    def _recompute_old(self, data: SegmentBatch, minibatches: list[list[int]] | None = None) -> None:
        """The training forward's log-probs as PPO's old log-probs, and its values in place of the rollout's
        (see ``recompute_logprobs``). The KL penalty keeps the sampled log-probs: they and the reference's come
        from the same bf16 decode, so an untrained policy's KL is 0 to float32 rounding (:mod:`agents.rollout_cache`).

        The forwards take the micro-batches of the first epoch's ``minibatches`` (default: about ``batch_size``
        tokens each, in order): bf16 results depend on the batch's shapes, so the same groups make PPO's first
        ratios exactly 1.
        """
        lengths, data.old_logprobs = data.mask.sum(dim=1).tolist(), data.logprobs.clone()
        minibatches = minibatches or token_groups(list(range(len(lengths))), lengths, self.batch_size)
        for rows in (micro for minibatch in minibatches for micro in self._micro_batches(data, minibatch)):
            sub = data.select(rows)
            steps = sub.mask.shape[1]
            evaluation = self.actor_critic(sub.ids, sub.attention_mask, sub.tokens, sub.positions(), sub.mask.bool(),
                                           self.rollout.allowed, entropy=False, keep=sub.keep)
            data.old_logprobs[rows, :steps] = evaluation.logprobs * sub.mask
            data.values[rows, :steps] = evaluation.values * sub.mask

    def _minibatches(self, mask: torch.Tensor) -> list[list[int]]:
        """Shuffled groups of whole segments holding about ``batch_size`` tokens each (over all ranks), or
        ``minibatches`` groups of equal numbers of segments.

        Data-parallel, every rank takes the same number of groups (DDP needs one backward per rank per step):
        the most any rank needs, but no more than the fewest segments any rank has.
        """
        order = torch.randperm(mask.shape[0]).tolist()
        if self.minibatches is not None:
            groups = [part.tolist() for part in np.array_split(np.array(order), min(self.minibatches, len(order)))]
        else:
            groups = token_groups(order, mask.sum(dim=1).tolist(), self.batch_size / distributed.world_size())
        if not distributed.active():
            return groups
        counts = distributed.gather(torch.tensor([len(groups), len(order)]))
        count = min(int(counts[0::2].max()), int(counts[1::2].min()))
        return [part.tolist() for part in np.array_split(np.array(order), count)]

    def _micro_batches(self, data: SegmentBatch, rows: list[int]) -> list[list[int]]:
        """The minibatch ``rows`` split into the forwards of at most ``micro_batch_tokens`` positions."""
        if self.micro_batch_tokens is None:
            return [rows]
        return micro_batches(rows, data.attention_mask.sum(dim=1).tolist(), self.micro_batch_tokens)

    def _update(self, data: SegmentBatch, rows: list[int], clip_range: float, clip_range_vf, actor: bool):
        """One optimizer step on the minibatch ``rows``, its gradient accumulated over its micro-batches."""
        self.policy.optimizer.zero_grad()
        micro = self._micro_batches(data, rows)
        stats: dict[str, float] = {}
        for index, part in enumerate(micro):
            last = index == len(micro) - 1  # DDP averages across ranks once, at the minibatch's last backward
            with self.data_parallel.no_sync() if self.data_parallel is not None and not last else nullcontext():
                loss, part_stats = self.segment_loss(data, part, clip_range, clip_range_vf, actor, minibatch=rows)
                loss.backward()
            for key, value in part_stats.items():
                stats[key] = stats.get(key, 0.0) + value
        if self.ptx is not None and actor:
            ptx_loss = self.ptx.loss(self.actor_critic.lm, self.actor_critic.precision)
            (self.ptx_coef * ptx_loss).backward()
            stats["ptx_loss"] = ptx_loss.item()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        return stats

    def segment_loss(self, data: SegmentBatch, rows: list[int], clip_range: float, clip_range_vf=None,
                     actor: bool = True, minibatch: list[int] | None = None):
        """SB3 PPO's loss on the tokens of the segments ``rows``, from one forward per segment, and its
        statistics, as their share of ``minibatch``'s (default: ``rows``): the advantages are whitened with the
        minibatch's statistics and every mean is over the minibatch's tokens, so the losses and statistics of
        a minibatch's parts sum to the minibatch's own.

        With ``actor=False`` (critic warm-up) the loss is the value loss alone and the policy LM gets no gradient.
        """
        minibatch = rows if minibatch is None else minibatch
        sub = data.select(rows)
        actor_critic = self.data_parallel or self.policy.actor_critic  # DDP averages the gradients across ranks
        valid = sub.mask.bool()
        log_prob, entropy, values, _ = actor_critic(sub.ids, sub.attention_mask, sub.tokens, sub.positions(), valid,
                                                    self.rollout.allowed, actor, entropy_grad=bool(self.ent_coef),
                                                    keep=sub.keep)
        count = data.mask[minibatch].sum()

        def mean(per_token: torch.Tensor) -> torch.Tensor:  # the minibatch's mean, over this part's tokens
            return per_token[valid].sum() / count

        advantages = sub.advantages
        if self.normalize_advantage and count > 1:
            advantages = masked_whiten(advantages, sub.mask, over=(data.advantages[minibatch], data.mask[minibatch]))
        ratio = torch.exp(log_prob - sub.old_logprobs)
        policy_loss = -mean(torch.min(advantages * ratio, advantages * ratio.clamp(1 - clip_range, 1 + clip_range)))
        if clip_range_vf is not None:
            values = sub.values + (values - sub.values).clamp(-clip_range_vf, clip_range_vf)
        value_loss = mean((sub.returns - values) ** 2)
        entropy_loss = -mean(entropy)
        loss = self.vf_coef * value_loss
        if actor:
            loss = loss + policy_loss + self.ent_coef * entropy_loss
        with torch.no_grad():
            log_ratio = log_prob - sub.old_logprobs
            stats = {
                "policy_gradient_loss": policy_loss.item(), "value_loss": value_loss.item(),
                "entropy_loss": entropy_loss.item(), "loss": loss.item(),
                "approx_kl": mean((log_ratio.exp() - 1) - log_ratio).item(),
                "clip_fraction": mean(((ratio - 1).abs() > clip_range).float()).item(),
                "ratio_mean": mean(ratio).item(),
            }
        return loss, stats

    def _log(self, data: SegmentBatch, logs: dict[str, list[float]], train_seconds: float) -> tuple[float, int]:
        """Record the update's statistics and the rollout's (over all ranks when data-parallel); return the
        rollout's mean KL per segment and its token count."""
        means = distributed.gather(torch.tensor([float(np.mean(v)) for v in logs.values()], dtype=torch.float64))
        for key, value in zip(logs, means.reshape(distributed.world_size(), -1).mean(dim=0).tolist()):
            self.logger.record(f"train/{key}", value)
        if data.returns is not None:  # a critic's
            valid = data.mask.bool()
            values, returns = (distributed.gather(t[valid]).numpy() for t in (data.values, data.returns))
            self.logger.record("train/explained_variance", explained_variance(values, returns))
        kl, tokens = self._log_rollout()
        self.logger.record("time/train_tokens_per_s", tokens * self.n_epochs / max(train_seconds, 1e-9))
        return kl, tokens

    def _log_rollout(self) -> tuple[float, int]:
        """Record the rollout's statistics (over all ranks when data-parallel), with or without an update, and
        watch them; return its mean KL per segment and its token count."""
        segments = self.rollout.segments
        kl = distributed.gather(torch.tensor([float(np.sum(s.logprobs) - np.sum(s.ref_logprobs)) for s in segments]))
        lengths = distributed.gather(torch.tensor([float(len(s.tokens)) for s in segments]))
        episodes = distributed.gather_objects(
            [(sum(s.scores), s.terminated, s.reward_components) for s in segments if s.ended])
        self.logger.record("train/kl_coef", self.kl_coef)  # the β this rollout used
        self.logger.record("rollout/kl_per_segment", float(kl.mean()))
        self.logger.record("rollout/response_length", float(lengths.mean()))
        self.logger.record("rollout/episodes", len(episodes))
        self.logger.record("rollout/eos_rate", float(np.mean([e[1] for e in episodes])) if episodes else 0.0)
        if episodes:
            scores = [e[0] for e in episodes]
            self.logger.record("rollout/reward_mean", float(np.mean(scores)))
            self.logger.record("rollout/reward_std", float(np.std(scores)))
            for name in episodes[-1][2]:
                parts = [e[2][name] for e in episodes if name in e[2]]
                self.logger.record(f"rollout/reward_{name}", float(np.mean(parts)))
        tokens = int(lengths.sum())
        self.logger.record("time/rollout_tokens_per_s", tokens / max(self.rollout.seconds, 1e-9))
        self._watch(float(kl.mean()), float(lengths.mean()))
        return float(kl.mean()), tokens

    def _watch(self, kl: float, length: float) -> None:
        """Warn when KL or response length runs away (reward hacking and collapse show there first)."""
        self.initial_length = self.initial_length or length
        if kl > self.watchdog_kl:
            warnings.warn(f"KL to the reference is {kl:.2f} nats per segment (> {self.watchdog_kl}): the policy is "
                          "drifting; lower the learning rate or raise kl_coef", RuntimeWarning, stacklevel=2)
        if not 0.5 <= length / self.initial_length <= 2.0:
            warnings.warn(f"mean response length moved from {self.initial_length:.1f} to {length:.1f} tokens: "
                          "check the samples for collapse", RuntimeWarning, stacklevel=2)


def token_groups(order: list[int], tokens: list[int], budget: float) -> list[list[int]]:
    """Consecutive groups of the rows in ``order``, each closed once it holds ``budget`` tokens."""
    groups, group, count = [], [], 0
    for row in order:
        group.append(row)
        count += tokens[row]
        if count >= budget:
            groups.append(group)
            group, count = [], 0
    return groups + [group] if group else groups


def micro_batches(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """``rows`` in groups whose padded forward holds at most ``budget`` positions: the rows longest first,
    each group as many rows as fit at the width of its longest (rounded up to the decoder's shape multiple,
    :data:`lm_gym.padding.SHAPE_MULTIPLE`); a row longer than ``budget`` goes alone."""
    groups, group = [], []
    for row in sorted(rows, key=lambda r: -lengths[r]):
        if group and (len(group) + 1) * round_up(int(lengths[group[0]]), SHAPE_MULTIPLE) > budget:
            groups.append(group)
            group = []
        group.append(row)
    return groups + [group] if group else groups


def with_precision(policy_kwargs: dict | None, precision) -> dict:
    """``policy_kwargs`` with ``precision`` set; a different precision already there raises."""
    kwargs = dict(policy_kwargs or {})
    if kwargs.get("precision", precision) != precision:
        raise ValueError(f"precision={precision!r} conflicts with policy_kwargs['precision']={kwargs['precision']!r}")
    return {**kwargs, "precision": precision}


def env_reference(env) -> ReferenceModel | None:
    """The reference model of an lm-gym env (``SB3VecEnv``, or a VecEnv of ``LanguageModelEnv``), or None."""
    reference = getattr(env, "reference", None)
    if reference is None and env.has_attr("reference"):
        reference = env.get_attr("reference", [0])[0]
    return reference if isinstance(reference, ReferenceModel) else None


def portable_policy_kwargs(kwargs: dict) -> dict:
    """``kwargs`` with loaded ``model``/``value_model`` replaced by their ``name_or_path`` (tokenizer dropped).

    The weights live in the checkpoint's state dict; the name only rebuilds the architecture on load.
    """
    portable = dict(kwargs)
    for key in ("model", "value_model"):
        model = portable.get(key)
        if isinstance(getattr(model, "model", None), torch.nn.Module) and not isinstance(model, torch.nn.Module):
            model = model.model  # a RewardModel: its classifier names the architecture; the weights are saved
        if isinstance(model, torch.nn.Module):
            name = getattr(model, "name_or_path", "")
            if not name:
                raise ValueError(f"policy_kwargs[{key!r}] is a loaded model without name_or_path: save it with "
                                 "save_pretrained and pass its directory, so the checkpoint can name it")
            portable[key] = name
            if key == "model":
                portable["tokenizer"] = None
    return portable


def _record_inserts(collector: SegmentCollector, row: int, obs) -> None:
    """Record the ids the env put into ``row`` after its action (multi-turn: a tool result, the other party's
    turn), read from the observation that follows; an env that changed the row's earlier ids is refused, since
    the update would train on ids other than those the agent saw."""
    segment = collector.open[row]
    expected = len(segment.context) + segment.stream_length
    if int(np.asarray(obs["attention_mask"][row]).sum()) == expected:
        return
    ids = _context(obs, row)
    if len(ids) < expected or ids[:expected] != segment.sequence():
        raise RuntimeError(f"env row {row} changed the tokens of its running episode: its observation no longer "
                           "starts with the ids observed and taken so far; an env must only append to an episode")
    collector.insert(row, ids[expected:])


def _context(obs, row: int) -> list[int]:
    mask = np.asarray(obs["attention_mask"][row]).astype(bool)
    return np.asarray(obs["input_ids"][row])[mask].astype(np.int64).tolist()


def rng_states() -> dict:
    """The states of Python's, numpy's and torch's global generators (CUDA's too, when present)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore :func:`rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
