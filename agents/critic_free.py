"""Critic-free policy optimisation for LMs: GRPO, Dr. GRPO, RLOO and REINFORCE++ on LMPPO's machinery.

:class:`CriticFreePPO` is :class:`agents.ppo.LMPPO` with the critic taken out: the same rollouts into segments,
one forward per episode, minibatches accumulated over micro-batches, bf16 with recomputed old log-probs,
data-parallel training, the SB3 surface and the collapse watchdog. What changes is where the advantages come
from and what the loss holds:

- **Advantages** from whole episodes, ``advantage=``:

  - ``"grpo"``: each episode's return standardised within its prompt group, (R - mean) / std (GRPO,
    Shao et al. 2024);
  - ``"dr_grpo"``: R - mean, without the division by the std (Dr. GRPO, Liu et al. 2025);
  - ``"rloo"``: R - the mean of the group's other episodes (the leave-one-out baseline, Ahmadian et al. 2024);
  - ``"reinforce++"``: the return to go of each token, standardised over the whole batch of tokens
    (REINFORCE++, Hu 2025); needs no groups.

  The group estimators need an env with prompt groups (``group_size=G >= 2``, see
  :class:`lm_gym.LanguageModelVectorEnv`); each advantage applies to every token of its episode.
- **KL to the reference**, ``kl=`` with β = ``kl_coef``:

  - ``"reward"``: k1 = log π(a) - log π_ref(a) of each sampled token, subtracted from the reward
    (r_t = score_t - β·k1_t, as LMPPO does), so it enters the returns and the advantages;
  - ``"loss"``: k3 = π_ref(a)/π(a) - log(π_ref(a)/π(a)) - 1, an unbiased and non-negative estimate of the KL,
    added to the loss as β·mean(k3) with its gradient through π (GRPO's);
  - ``"full"``: the exact KL(π ‖ π_ref) summed over the vocabulary at each position, from the logits the
    training forward computes anyway (in chunks) and a forward of the reference, added to the loss as β·mean.

- **Loss normalisation**, ``loss_normalization=``: ``"token"`` averages the clipped objective over all tokens
  of a minibatch (every token weighs the same, whatever its episode's length: DAPO's and Dr. GRPO's choice);
  ``"sequence"`` averages within each episode first and then over episodes (GRPO's original: a long
  episode's tokens weigh less).
- **Group filtering**: with ``filter_groups`` (default), groups whose episodes all have the same return carry
  no signal for a group estimator and are left out of the update; ``train/groups_uniform`` counts them.

Only whole episodes train: each rollout starts fresh episodes, and an episode the rollout cut, or a group with
such an episode, is left out (make ``n_steps`` at least the env's ``max_new_tokens``). PPO's ratio is clipped
to 1 ± ``clip_range`` over ``n_epochs`` epochs, as GRPO and RLOO implementations do.
"""

from __future__ import annotations

import torch

from agents import distributed
from agents.advantages import (
    ESTIMATORS, GROUP_ESTIMATORS, group_advantages, kl_shaped_rewards, masked_whiten, returns_to_go,
    uniform_groups,
)
from agents.kl import KL_PLACEMENTS, k3
from agents.policy import TransformerActorCriticPolicy
from agents.ppo import LMPPO
from agents.segments import SegmentBatch

LOSS_NORMALIZATIONS = ("token", "sequence")


class CriticFreePPO(LMPPO):
    """Critic-free PPO for token episodes (see the module docstring).

    Takes :class:`agents.ppo.LMPPO`'s keywords (the critic's are not used), plus:

    :param advantage: ``"grpo"``, ``"dr_grpo"``, ``"rloo"`` or ``"reinforce++"``.
    :param kl: where the KL to the reference enters: ``"reward"`` (k1), ``"loss"`` (k3) or ``"full"`` (exact).
    :param kl_coef: β of the KL term.
    :param loss_normalization: ``"token"`` or ``"sequence"``.
    :param filter_groups: leave groups whose returns are all equal out of the update.
    """

    def __init__(self, policy=TransformerActorCriticPolicy, env=None, advantage: str = "grpo", kl: str = "loss",
                 kl_coef: float = 0.04, loss_normalization: str = "token", filter_groups: bool = True,
                 n_epochs: int = 2, normalize_reward: bool = False, **kwargs):
        if advantage not in ESTIMATORS:
            raise ValueError(f"advantage={advantage!r}; expected one of {ESTIMATORS}")
        if kl not in KL_PLACEMENTS:
            raise ValueError(f"kl={kl!r}; expected one of {KL_PLACEMENTS}")
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization={loss_normalization!r}; expected one of {LOSS_NORMALIZATIONS}")
        for critic_setting in ("critic_warmup", "kl_target"):
            if kwargs.get(critic_setting):
                raise ValueError(f"{critic_setting} is an LMPPO setting; {type(self).__name__} has no critic to "
                                 "warm up and keeps β fixed")
        self.advantage, self.kl, self.loss_normalization = advantage, kl, loss_normalization
        self.filter_groups = filter_groups
        super().__init__(policy, env, kl_coef=kl_coef, n_epochs=n_epochs, normalize_reward=normalize_reward,
                         normalize_advantage=False, vf_coef=0.0, clip_range_vf=None, **kwargs)
        self._check_groups()

    @property
    def group_size(self) -> int:
        """Rows per prompt group of the env (1 when it has no groups)."""
        return self.env.get_attr("group_size")[0] if self.env.has_attr("group_size") else 1

    def _check_groups(self) -> None:
        if self.advantage not in GROUP_ESTIMATORS or self.env is None:
            return
        group_size = self.group_size
        if group_size < 2:
            raise ValueError(f"advantage={self.advantage!r} compares the episodes of a prompt group: give the env "
                             f"group_size >= 2 (SB3VecEnv(num_envs, group_size=G, ...)); it has {group_size}")

    # --- rollouts ------------------------------------------------------------------------------------

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        """LMPPO's rollout, on fresh episodes (reset here unless :meth:`reset_episodes` just did): the update
        trains on whole episodes only."""
        if not getattr(self, "fresh_episodes", False):
            self.reset_episodes()
        self.fresh_episodes = False
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _training_batch(self) -> SegmentBatch | None:
        """The whole episodes of the rollout (of complete groups, without uniform ones when filtering), or None
        when none is left."""
        episodes = [s for s in self.rollout.segments if s.ended]
        if not episodes:
            raise RuntimeError(f"no episode ended within the rollout's n_steps={self.n_steps}: make n_steps at least "
                               "the env's max_new_tokens")
        self.group_counts = {"groups_cut": 0, "groups_uniform": 0}
        if self.advantage in GROUP_ESTIMATORS:
            episodes = self._whole_groups(episodes)
        pad = self.actor_critic.tokenizer.pad_token_id
        data = SegmentBatch.from_segments(episodes, pad, self.device) if episodes else None
        self.training_groups = [s.group for s in episodes]
        if data is not None and self.advantage in GROUP_ESTIMATORS and self.filter_groups:
            data = self._without_uniform_groups(data)
        self._record_group_counts()
        return data

    def _whole_groups(self, episodes: list) -> list:
        """The episodes of groups complete in the rollout (all G members ended), counting the others."""
        members: dict = {}
        for segment in episodes:
            members.setdefault(segment.group, []).append(segment)
        self.group_counts["groups_cut"] = sum(len(group) != self.group_size for group in members.values())
        return [s for group in members.values() if len(group) == self.group_size for s in group]

    def _without_uniform_groups(self, data: SegmentBatch) -> SegmentBatch | None:
        """``data`` without the groups whose returns are all equal (no signal), counting them; None if none is left."""
        uniform = uniform_groups(self._returns_to_go(data)[:, 0], self.training_groups).tolist()
        self.group_counts["groups_uniform"] = len({g for g, flat in zip(self.training_groups, uniform) if flat})
        keep = [row for row, flat in enumerate(uniform) if not flat]
        self.training_groups = [self.training_groups[row] for row in keep]
        return data.select(keep) if keep else None

    def _returns_to_go(self, data: SegmentBatch) -> torch.Tensor:
        """(S, T) returns to go of ``data``'s tokens: the scores, less β·k1 per token with the KL in the reward."""
        kl_coef = self.kl_coef if self.kl == "reward" else 0.0
        rewards = kl_shaped_rewards(data.scores, data.logprobs, data.ref_logprobs, data.mask, kl_coef)
        return returns_to_go(rewards, data.mask)

    # --- training ------------------------------------------------------------------------------------

    def _fill_advantages(self, data: SegmentBatch, minibatches: list[list[int]] | None = None) -> None:
        """Sequence (or REINFORCE++'s token) advantages of ``data``'s episodes, after the old log-probs are
        recomputed where LMPPO recomputes them."""
        self._set_old_logprobs(data, minibatches)
        to_go = self._returns_to_go(data)
        if self.advantage == "reinforce++":
            data.advantages = masked_whiten(to_go, data.mask)
        else:
            sequence = group_advantages(to_go[:, 0], self.training_groups, self.advantage)
            data.advantages = sequence[:, None] * data.mask
        data.returns = None

    def segment_loss(self, data: SegmentBatch, rows: list[int], clip_range: float, clip_range_vf=None,
                     actor: bool = True, minibatch: list[int] | None = None):
        """The clipped policy-gradient loss on the tokens of the episodes ``rows``, plus β·KL when the KL is in
        the loss, as their share of ``minibatch``'s (default: ``rows``), from one forward per episode."""
        minibatch = rows if minibatch is None else minibatch
        sub = data.select(rows)
        actor_critic = self.data_parallel or self.policy.actor_critic
        valid = sub.mask.bool()
        evaluation = actor_critic(sub.ids, sub.attention_mask, sub.tokens, sub.positions(), valid, self.rollout.allowed,
                                  entropy_grad=bool(self.ent_coef),
                                  reference=self.reference if self.kl == "full" else None, keep=sub.keep)
        weights = self._token_weights(data, rows, minibatch)
        ratio = torch.exp(evaluation.logprobs - sub.old_logprobs)
        advantages = sub.advantages
        surrogate = torch.min(advantages * ratio, advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
        policy_loss = -(surrogate * weights).sum()
        kl = evaluation.kl if self.kl == "full" else k3(evaluation.logprobs, sub.ref_logprobs)
        kl_loss = (kl * weights).sum()
        entropy_loss = -(evaluation.entropy * weights).sum()
        loss = policy_loss + self.ent_coef * entropy_loss
        if self.kl != "reward":
            loss = loss + self.kl_coef * kl_loss
        with torch.no_grad():
            log_ratio = (evaluation.logprobs - sub.old_logprobs) * valid
            stats = {
                "policy_gradient_loss": policy_loss.item(), "kl_loss": kl_loss.item(),
                "entropy_loss": entropy_loss.item(), "loss": loss.item(),
                "approx_kl": ((log_ratio.exp() - 1 - log_ratio) * weights).sum().item(),
                "clip_fraction": ((((ratio - 1).abs() > clip_range).float()) * weights).sum().item(),
                "ratio_mean": (ratio * weights).sum().item(),
            }
        return loss, stats

    def _token_weights(self, data: SegmentBatch, rows: list[int], minibatch: list[int]) -> torch.Tensor:
        """(len(rows), T) weights of the tokens of ``rows`` in ``minibatch``'s mean: 1 / its token count, or
        1 / (episode length · its episode count) with sequence normalisation."""
        steps = int(data.mask[rows].sum(dim=1).max())
        mask = data.mask[rows][:, :steps]
        if self.loss_normalization == "token":
            return mask / data.mask[minibatch].sum()
        return mask / (mask.sum(dim=1, keepdim=True) * len(minibatch))

    def _record_group_counts(self) -> None:
        """Log the groups left out of the update, over all ranks when data-parallel."""
        for key, count in self.group_counts.items():
            self.logger.record(f"train/{key}", int(distributed.gather(torch.tensor([count])).sum()))


class GRPO(CriticFreePPO):
    """Group Relative Policy Optimization: :class:`CriticFreePPO` with ``advantage="grpo"`` and the KL (k3) in
    the loss; ``advantage="dr_grpo"`` drops the division by the group's std."""

    def __init__(self, policy=TransformerActorCriticPolicy, env=None, advantage: str = "grpo", kl: str = "loss",
                 **kwargs):
        super().__init__(policy, env, advantage=advantage, kl=kl, **kwargs)


class RLOO(CriticFreePPO):
    """REINFORCE Leave-One-Out: :class:`CriticFreePPO` with ``advantage="rloo"`` and the KL (k1) in the reward."""

    def __init__(self, policy=TransformerActorCriticPolicy, env=None, kl: str = "reward", **kwargs):
        super().__init__(policy, env, advantage="rloo", kl=kl, **kwargs)


class ReinforcePlusPlus(CriticFreePPO):
    """REINFORCE++: :class:`CriticFreePPO` with batch-normalised token advantages and the KL (k1) in the reward."""

    def __init__(self, policy=TransformerActorCriticPolicy, env=None, kl: str = "reward", **kwargs):
        super().__init__(policy, env, advantage="reinforce++", kl=kl, **kwargs)
