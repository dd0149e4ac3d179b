"""The TorchRL adapter: GymWrapper envs (single, vector SAME_STEP / DISABLED) and the Transformer actor-critic."""

import pytest
import torch
from gymnasium.vector import AutoresetMode
from torchrl.data import Categorical
from torchrl.envs.utils import check_env_specs
from torchrl.objectives import ClipPPOLoss

from agents.actor_critic import TransformerActorCritic
from agents.integrations.torchrl import LOG_PROB_KEY, make_torchrl_actor_critic, make_torchrl_gae
from lm_gym.integrations.torchrl import make_torchrl_env

MAX_NEW_TOKENS = 4
ALLOWED = [5, 6, 7, 8]


def length_reward(prompts, responses, **context):
    return [1.0 + len(r) for r in responses]  # >= 1: every final step has a visible reward


@pytest.fixture
def env_kwargs(tiny):
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=64,
                reward=length_reward)


@pytest.fixture
def actor_critic():
    return TransformerActorCritic.from_pretrained("tiny", device="cpu")


def random_rollout(env, steps=12, seed=0):
    torch.manual_seed(seed)
    env.set_seed(seed)
    return env.rollout(steps, break_when_any_done=False)


def assert_token_transitions(rollout):
    """Each step appends the action; rewards (>= 1) only at episode ends; done = terminated | truncated."""
    after = rollout["next"]
    assert torch.equal(after["input_ids"][..., -1], rollout["action"])
    assert torch.equal(after["attention_mask"][..., -1], torch.ones_like(rollout["action"]))
    done = after["done"].squeeze(-1)
    assert torch.equal(done, (after["terminated"] | after["truncated"]).squeeze(-1))
    reward = after["reward"].squeeze(-1)
    assert (reward[done] >= 1).all() and (reward[~done] == 0).all()
    return done


def assert_episodes_restart(rollout, done):
    """Along time (last dim), a finished row starts a new episode; an unfinished one carries its observation on."""
    carried = (rollout["input_ids"][..., 1:, :] == rollout["next", "input_ids"][..., :-1, :]).all(-1)
    assert torch.equal(carried, ~done[..., :-1])


def test_single_env_random_rollout(env_kwargs, tiny):
    env = make_torchrl_env(**env_kwargs)
    check_env_specs(env)
    vocab = tiny[0].get_output_embeddings().weight.shape[0]
    assert isinstance(env.action_spec, Categorical) and env.action_spec.space.n == vocab
    assert env.action_spec.shape == () and env.batch_size == ()
    rollout = random_rollout(env)
    assert rollout.batch_size == (12,) and rollout["input_ids"].shape == (12, 64 + MAX_NEW_TOKENS)
    done = assert_token_transitions(rollout)
    assert done.sum() >= 12 // MAX_NEW_TOKENS
    assert_episodes_restart(rollout, done)
    assert (rollout["next", "ref_logprob"] < 0).all()


@pytest.mark.parametrize("autoreset_mode", ["same_step", AutoresetMode.DISABLED])
def test_vector_env_random_rollout_with_partial_resets(env_kwargs, tiny, autoreset_mode):
    stop = tiny[1].eos_token_id
    env = make_torchrl_env(3, autoreset_mode=autoreset_mode, allowed_token_ids=ALLOWED + [stop], **env_kwargs)
    check_env_specs(env)
    vocab = tiny[0].get_output_embeddings().weight.shape[0]
    assert isinstance(env.action_spec, Categorical) and env.action_spec.space.n == vocab
    assert env.batch_size == (3,) and env.action_spec.shape == (3,)
    rollout = random_rollout(env, steps=16)
    assert rollout.batch_size == (3, 16)
    assert set(rollout["action"].unique().tolist()) <= set(ALLOWED + [stop])  # the action mask reaches the spec
    assert rollout["action_mask"].sum(-1).eq(len(ALLOWED) + 1).all()
    done = assert_token_transitions(rollout)  # also on done steps: the final observation, not the reset one
    after = rollout["next"]
    assert after["terminated"].any() and after["truncated"].any()
    assert not done.all(0).all()  # rows finish at different steps: partial resets happen
    assert_episodes_restart(rollout, done)
    assert (after["ref_logprob"] < 0).all()


@pytest.mark.parametrize("mode", ["next_step", AutoresetMode.NEXT_STEP])
def test_next_step_autoreset_is_rejected(env_kwargs, mode):
    with pytest.raises(ValueError, match="'same_step', 'disabled'"):
        make_torchrl_env(2, autoreset_mode=mode, **env_kwargs)


@pytest.mark.parametrize("num_envs, autoreset_mode", [(None, None), (3, "same_step"), (3, "disabled")])
def test_actor_logprobs_are_the_env_reference_logprobs(env_kwargs, tiny, actor_critic, num_envs, autoreset_mode):
    """Same weights, temperature 1: log π(a|s) of the sampled token is the env's ref_logprob of it, across resets."""
    stops = list(range(0, tiny[0].get_output_embeddings().weight.shape[0], 5))  # episodes of different lengths
    env = make_torchrl_env(num_envs, autoreset_mode=autoreset_mode or "same_step", stop_token_ids=stops, **env_kwargs)
    actor, _ = make_torchrl_actor_critic(actor_critic, env)
    torch.manual_seed(0)
    env.set_seed(0)
    with torch.no_grad():
        rollout = env.rollout(12, actor, break_when_any_done=False)
    done = assert_token_transitions(rollout)
    assert done.sum() >= 3 and rollout["action"].unique().numel() > 5  # sampled, not argmax; several episodes
    torch.testing.assert_close(rollout[LOG_PROB_KEY], rollout["next", "ref_logprob"], atol=1e-4, rtol=0)


def test_actor_obeys_the_action_mask(env_kwargs, actor_critic):
    env = make_torchrl_env(2, allowed_token_ids=ALLOWED, **env_kwargs)
    actor, _ = make_torchrl_actor_critic(actor_critic, env)
    assert "action_mask" in actor.in_keys
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = env.rollout(8, actor, break_when_any_done=False)
    assert set(rollout["action"].unique().tolist()) <= set(ALLOWED)
    disallowed = torch.ones(rollout["logits"].shape[-1], dtype=torch.bool)
    disallowed[ALLOWED] = False
    assert (rollout["logits"][..., disallowed] == torch.finfo(torch.float32).min).all()
    assert (rollout[LOG_PROB_KEY] > rollout["next", "ref_logprob"]).all()  # renormalised over the allowed tokens


def test_clip_ppo_loss_trains_lm_and_value_head(env_kwargs, actor_critic):
    env = make_torchrl_env(3, **env_kwargs)
    actor, value = make_torchrl_actor_critic(actor_critic, env)
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = env.rollout(8, actor, break_when_any_done=False)
        make_torchrl_gae(value)(rollout)
    assert rollout["advantage"].shape == rollout["value_target"].shape == (3, 8, 1)
    done = rollout["next", "done"]
    # gamma 1, V = 0 at the start (zero-initialised value head): the target is the episode's final reward
    assert torch.equal(rollout["value_target"][done], rollout["next", "reward"][done])
    losses = ClipPPOLoss(actor, value, entropy_coeff=0.0)(rollout.reshape(-1))
    (losses["loss_objective"] + losses["loss_critic"]).backward()
    groups = actor_critic.parameter_groups()
    for part in ("body", "value"):
        grads = [p.grad for p in groups[part] if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), part
