"""Reward-model training from preference pairs on the tiny model: the loss, save/load, evaluation, errors."""

import json

import pytest
import torch

from agents import LMPPO, RewardModel, evaluate_reward_model, train_reward_model
from agents.reward_model import length_grouped_batches, wilson_interval
from lm_gym.data import PreferencePair
from lm_gym.padding import pad_left
from lm_gym.rewards import RewardModelReward
from lm_gym.sb3 import SB3VecEnv

# A preference a tiny model can learn fast: the chosen response says "yes", the rejected one "no".
PAIRS = [PreferencePair(f"Question {i}?", "yes " * (1 + i % 3), "no " * (1 + i % 2)) for i in range(24)]
HH = [PreferencePair("\n\nHuman: Is it safe?\n\nAssistant:", "yes", "no")]


def test_training_learns_the_preference_and_logs_its_progress():
    rm = train_reward_model(PAIRS, "tiny", lr=3e-3, epochs=3, batch_size=8, eval_pairs=PAIRS[:8], progress=False)
    first, last = rm.history[0], rm.history[-1]
    assert len(rm.history) == 3 * 3 and set(first) >= {"loss", "accuracy", "reward_mean", "reward_std", "margin"}
    assert last["loss"] < first["loss"] and last["accuracy"] == 1.0
    assert rm.evaluation["accuracy"] == 1.0 and rm.evaluation["pairs"] == 8
    scores = rm.score([p.prompt for p in PAIRS], [p.chosen for p in PAIRS])
    assert scores.shape == (24,)


def test_margin_and_centring_terms_change_the_loss():
    common = dict(lr=0.0, epochs=1, batch_size=24, progress=False)
    plain = train_reward_model(PAIRS, "tiny", **common).history[0]["loss"]
    with_margin = train_reward_model(PAIRS, "tiny", margin=1.0, **common).history[0]["loss"]
    per_pair = train_reward_model(PAIRS, "tiny", margin=[1.0] * len(PAIRS), **common).history[0]["loss"]
    centred = train_reward_model(PAIRS, "tiny", center_coef=10.0, **common).history[0]["loss"]
    assert with_margin > plain and per_pair == pytest.approx(with_margin) and centred > plain
    with pytest.raises(ValueError, match="one per pair"):
        train_reward_model(PAIRS, "tiny", margin=[1.0, 2.0], progress=False)


def test_save_load_and_the_env_reward_read_the_same_model(tmp_path):
    rm = train_reward_model(PAIRS, "tiny", lr=3e-3, epochs=1, progress=False)
    directory = rm.save(tmp_path / "rm")
    stats = json.loads((directory / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(rm.mean) and stats["std"] == pytest.approx(rm.std) and rm.std > 0
    loaded = RewardModel.load(directory)
    prompts, responses = [p.prompt for p in PAIRS[:4]], [p.chosen for p in PAIRS[:4]]
    assert torch.allclose(loaded.score(prompts, responses), rm.score(prompts, responses), atol=1e-5)
    reward = RewardModelReward(directory, normalize=True)
    expected = (rm.score(prompts, responses) - rm.mean) / rm.std
    assert torch.allclose(reward(prompts, responses), expected, atol=1e-4)
    assert torch.allclose(rm.as_reward()(prompts, responses), expected, atol=1e-4)


def test_lora_reward_model_saves_as_a_plain_classifier(tmp_path):
    rm = train_reward_model(PAIRS, "tiny", lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                            lr=3e-3, epochs=1, progress=False)
    prompts, responses = [p.prompt for p in PAIRS[:4]], [p.chosen for p in PAIRS[:4]]
    before = rm.score(prompts, responses)
    loaded = RewardModel.load(rm.save(tmp_path / "rm"))
    assert not hasattr(loaded.model, "peft_config")
    assert torch.allclose(loaded.score(prompts, responses), before, atol=1e-4)


def test_train_layers_freezes_the_lower_blocks():
    rm = train_reward_model(PAIRS, "tiny", train_layers=1, lr=3e-3, epochs=1, progress=False)
    trainable = {name for name, p in rm.model.named_parameters() if p.requires_grad}
    assert any(".layers.1." in name for name in trainable) and not any(".layers.0." in name for name in trainable)
    assert not any("embed_tokens" in name for name in trainable) and any("score" in name for name in trainable)


def test_hh_transcript_prompts_are_formatted_as_chat_messages():
    rm = train_reward_model(HH, "tiny", lr=0.0, epochs=1, progress=False)
    as_messages = rm.score([[{"role": "user", "content": "Is it safe?"}]], ["yes"])
    assert torch.allclose(rm.score([HH[0].prompt], ["yes"]), as_messages)


def test_evaluation_reports_a_wilson_interval_and_margins():
    rm = train_reward_model(PAIRS, "tiny", lr=0.0, epochs=1, progress=False)
    result = evaluate_reward_model(rm, PAIRS)
    low, high = result["ci95"]
    assert low <= result["accuracy"] <= high and len(result["margins"]) == len(PAIRS)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-3)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        train_reward_model([], "tiny", progress=False)
    rm = train_reward_model(PAIRS[:2], "tiny", lr=0.0, progress=False)
    rm.save(tmp_path / "rm")
    (tmp_path / "rm" / "reward_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="reward_stats.json"):
        RewardModel.load(tmp_path / "rm")
    with pytest.warns(UserWarning, match="longer than max_length=8"):
        train_reward_model(PAIRS[:2], "tiny", max_length=8, lr=0.0, progress=False)


def test_lmppo_critic_starts_from_the_reward_model(tmp_path, tiny):
    rm = train_reward_model(PAIRS, "tiny", lr=3e-3, epochs=2, progress=False)
    directory = rm.save(tmp_path / "rm")
    model, tokenizer = tiny
    env = SB3VecEnv(2, model=model, tokenizer=tokenizer, prompts=[p.prompt for p in PAIRS], max_new_tokens=4,
                    max_prompt_tokens=64, reward=rm.as_reward())
    for value_model in (directory, rm):
        agent = LMPPO(env=env, n_steps=4, device="cpu", seed=0,
                      policy_kwargs={"model": "tiny", "value_head": "separate", "value_model": value_model})
        texts = [rm.tokenizer.apply_chat_template([{"role": "user", "content": p.prompt},
                                                   {"role": "assistant", "content": p.chosen}], tokenize=False)
                 for p in PAIRS[:3]]
        ids = [rm.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        batch, mask = pad_left(ids, tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            values = agent.actor_critic.evaluate(batch, mask, logits=False).values[:, -1]
        expected = (rm.score([p.prompt for p in PAIRS[:3]], [p.chosen for p in PAIRS[:3]]) - rm.mean) / rm.std
        assert torch.allclose(values, expected, atol=1e-4)  # V(full exchange) = the standardised reward
    agent.save(tmp_path / "agent")
    assert (tmp_path / "agent.zip").stat().st_size < 5_000_000


def test_length_grouped_batches_cover_every_pair_once_with_little_padding():
    lengths = [int(x) for x in torch.randint(5, 500, (300,), generator=torch.Generator().manual_seed(1))]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lengths)  # random batches of 8 would pad to about 1.6x
