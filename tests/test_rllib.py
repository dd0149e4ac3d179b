"""RLlib adapter: the RLModule matches the shared actor-critic, and PPO trains on a local Ray instance."""

import math
import os

import numpy as np
import pytest
import ray
import torch
from ray.rllib.core.columns import Columns

from agents.actor_critic import TransformerActorCritic
from agents.rollout_cache import RolloutCache
from agents.integrations.rllib import TransformerPPOLearner, TransformerRLModule, ppo_config
from lm_gym.integrations.rllib import make_env

ALLOWED = [5, 6, 7, 8]
ENV_CONFIG = {"model": "tiny", "max_new_tokens": 4, "max_prompt_tokens": 32, "truncate_prompt": "left", "device": "cpu"}


def count_token_five(prompts, responses, response_ids=None, **context):
    """Reward: how often token 5 was chosen (module level, so that Ray workers can import it)."""
    return [float(list(ids).count(5)) for ids in response_ids]


def batched(obs):
    """A batch of one observation, as RLlib's connectors hand it to the module (nested dicts of tensors)."""
    if isinstance(obs, dict):
        return {key: batched(value) for key, value in obs.items()}
    return torch.as_tensor(obs)[None]


def test_module_logits_match_actor_critic_and_mask(monkeypatch):
    env = make_env({**ENV_CONFIG, "allowed_token_ids": ALLOWED})
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    module = TransformerRLModule(
        observation_space=env.observation_space, action_space=env.action_space,
        model_config={"model": "tiny", "device": "cpu", "temperature": 0.7, "vf_share_layers": False},
    )
    reference = TransformerActorCritic.from_pretrained("tiny", temperature=0.7, device="cpu")
    allowed = torch.zeros(env.action_space.n, dtype=torch.bool)
    allowed[ALLOWED] = True

    # Rollouts (as on env runners): masked logits equal the actor-critic's; later steps use the KV cache.
    batch = {Columns.OBS: batched(obs)}
    explore = module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS]
    tokens = batch[Columns.OBS]["observations"]
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        expected, _ = reference.act(ids, mask, RolloutCache())
    torch.testing.assert_close(explore[:, allowed], expected[:, allowed])
    probs = torch.softmax(explore, dim=-1)
    assert torch.all(probs[:, ~allowed] == 0) and torch.isclose(probs.sum(), torch.tensor(1.0))

    lm = module.actor_critic.lm
    cache = module.rollout_cache._backbones[id(lm)].batch
    prefills = []
    monkeypatch.setattr(cache, "prefill", lambda *args, **kwargs: prefills.append(args))
    next_batch = {Columns.OBS: batched(env.step(ALLOWED[0])[0])}
    explore = module.forward_exploration(next_batch)[Columns.ACTION_DIST_INPUTS]
    assert not prefills and module.rollout_cache._backbones[id(lm)].batch is cache  # one new token, no re-encoding
    next_tokens = next_batch[Columns.OBS]["observations"]
    expected = reference.evaluate(next_tokens["input_ids"], next_tokens["attention_mask"]).logits[:, -1]  # full forward
    expected = torch.log_softmax(expected.detach()[:, allowed], -1)  # the cache gives log-probs, a full forward logits
    torch.testing.assert_close(torch.log_softmax(explore[:, allowed], -1), expected, atol=1e-4, rtol=1e-4)
    backbone = module.rollout_cache._backbones[id(lm)]
    module.set_state(module.get_state())  # RLlib's weight sync makes the cache stale: it is dropped
    assert not backbone.fits(lm, next_tokens["input_ids"])

    # Training: the same logits with gradients, and V from the embeddings without another forward.
    train = module.forward_train(batch)
    evaluation = reference.evaluate(ids, mask)
    logits, hidden = evaluation.logits[:, -1], evaluation.hidden[:, -1]
    torch.testing.assert_close(train[Columns.ACTION_DIST_INPUTS][:, allowed], logits[:, allowed])
    assert train[Columns.ACTION_DIST_INPUTS].requires_grad
    assert torch.all(torch.softmax(train[Columns.ACTION_DIST_INPUTS], -1)[:, ~allowed] == 0)
    dist = module.get_train_action_dist_cls().from_logits(train[Columns.ACTION_DIST_INPUTS])
    assert torch.isfinite(dist.entropy()).all()
    torch.testing.assert_close(module.compute_values(batch, train[Columns.EMBEDDINGS]), reference.values_of(hidden))
    torch.testing.assert_close(module.compute_values(batch), reference.evaluate(ids, mask, logits=False).values[:, -1].detach())


@pytest.fixture
def local_ray():
    """A small local Ray instance (no dashboard, no network), shut down afterwards."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
        ignore_reinit_error=True,
    )
    yield
    ray.shutdown()


def module_weights(algo) -> dict[str, np.ndarray]:
    return {name: np.array(value, copy=True) for name, value in algo.get_module().get_state().items()}


def test_ppo_trains_on_two_env_runners(local_ray):
    env_config = {**ENV_CONFIG, "reward": count_token_five, "allowed_token_ids": ALLOWED}
    config = (
        ppo_config(env_config, {"device": "cpu", "learning_rates": {"value": 1e-3}}, lr=1e-3,
                   train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        .env_runners(num_env_runners=2, num_cpus_per_env_runner=1, rollout_fragment_length=32)
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        before = module_weights(algo)
        for _ in range(2):
            result = algo.train()
        after = module_weights(algo)
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert runners["num_episodes_lifetime"] > 0
    assert math.isfinite(runners["episode_return_mean"]) and runners["episode_return_mean"] >= 0
    assert runners["num_env_steps_sampled_lifetime"] >= 128
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert any("value_net_head" in name for name in changed) and any("lm." in name for name in changed)


def test_ppo_config_wiring_and_plain_env():
    env = make_env(ENV_CONFIG)
    assert set(env.reset(seed=0)[0]) == {"input_ids", "attention_mask"}  # no mask without allowed_token_ids
    config = ppo_config(ENV_CONFIG, {"lora": None}, lr=3e-5, num_epochs=2)
    assert config.env == "LanguageModelEnv-v0" and config.env_config == ENV_CONFIG
    spec = config.rl_module_spec
    assert spec.module_class is TransformerRLModule and spec.model_config == {"model": "tiny", "lora": None}
    assert config.learner_class is TransformerPPOLearner
    assert (config.lr, config.num_epochs, config.gamma, config.lambda_, config.clip_param) == (3e-5, 2, 1.0, 0.95, 0.2)
    assert config.entropy_coeff == 0.0 and not config.use_kl_loss
    with pytest.raises(ValueError, match="unknown keys"):
        ppo_config(ENV_CONFIG, {"modle": "tiny"})
    with pytest.raises(ValueError, match="unknown parts"):
        TransformerRLModule(observation_space=env.observation_space, action_space=env.action_space,
                            model_config={"model": "tiny", "device": "cpu", "learning_rates": {"values": 1e-3}})
