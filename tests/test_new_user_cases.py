"""Cases found when lm-gym was tried as a new user would: each works, or fails with a message that says why."""

import dataclasses
import gzip
import json

import numpy as np
import pytest
import torch

from agents import LMPPO, MaskableTransformerActorCriticPolicy
from agents.cli import main
from agents.train import TrainConfig
from lm_gym import LanguageModelEnv, load_model
from lm_gym.data import DataError, load_preferences
from lm_gym.sb3 import SB3VecEnv

ALLOWED = [5, 6, 7]


@pytest.fixture
def masked_env(tiny):
    model, tokenizer = tiny
    return SB3VecEnv(2, model=model, tokenizer=tokenizer, max_new_tokens=3, max_prompt_tokens=48,
                     allowed_token_ids=ALLOWED, reward=lambda prompts, responses: [0.0] * len(responses))


def test_predict_with_action_masks_on_one_unbatched_observation(masked_env, tiny):
    agent = LMPPO(env=masked_env, n_steps=3, policy_kwargs={"model": "tiny", "device": "cpu"}, device="cpu", seed=0)
    single = LanguageModelEnv(model=tiny[0], tokenizer=tiny[1], max_new_tokens=3, max_prompt_tokens=48,
                              allowed_token_ids=ALLOWED)
    obs, _ = single.reset(seed=0)
    action, _ = agent.predict(obs, action_masks=single.action_masks())
    assert np.ndim(action) == 0 and int(action) in ALLOWED
    batched, _ = agent.predict(masked_env.reset(), action_masks=np.stack(masked_env.env_method("action_masks")))
    assert batched.shape == (2,) and set(batched.tolist()) <= set(ALLOWED)


def test_lmppo_takes_the_maskable_policy(masked_env):
    agent = LMPPO(MaskableTransformerActorCriticPolicy, masked_env, n_steps=3, batch_size=8, n_epochs=1,
                  policy_kwargs={"model": "tiny", "device": "cpu"}, device="cpu", seed=0)
    agent.learn(6)
    assert all(token in ALLOWED for segment in agent.rollout.segments for token in segment.tokens)


def test_a_reward_function_without_context_keywords_works(make_tiny_env):
    env = make_tiny_env(max_new_tokens=2, reward=lambda prompts, responses: [float(len(r)) for r in responses])
    env.reset(seed=0)
    env.step(70)
    *_, info = env.step(71)
    assert info["reward_components"]["<lambda>"] == float(len(info["response_text"]))


@pytest.mark.parametrize("output, expected", [(lambda r: ["good"] * len(r), "list"), (lambda r: None, "NoneType")])
def test_a_reward_of_the_wrong_type_is_named_in_the_error(make_tiny_env, output, expected):
    def judge(prompts, responses, **context):
        return output(responses)

    env = make_tiny_env(max_new_tokens=1, reward=judge)
    env.reset(seed=0)
    with pytest.raises(TypeError, match=rf"reward 'judge' returned .* \({expected}\) for responses such as .*"
                                        r"expected 1 real numbers"):
        env.step(70)


def test_cuda_without_a_cuda_device_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    with pytest.raises(ValueError, match="no CUDA device is available here; pass device='cpu'"):
        load_model("tiny", device="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        LanguageModelEnv(model="tiny", device="cuda:0")


def test_a_malformed_preference_row_says_how_to_skip_it(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    rows = [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."},
            {"chosen": "no transcript here"}]
    with gzip.open(path, "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"line 2.*\n.*on_error='skip'.*\.report.*counts the rows read, kept and "
                                        r"skipped"):
        load_preferences(path)
    with pytest.warns(UserWarning, match="skipped 1"):
        kept = load_preferences(path, on_error="skip")
    assert len(kept) == 1 and kept.report.rows_read == 2 and kept.report.skipped


def test_every_train_flag_says_what_it_means(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse re-wraps the lines
    for name, meaning in TrainConfig.HELP.items():
        assert "".join(meaning.split()) in out, name
    assert set(TrainConfig.HELP) == {field.name for field in dataclasses.fields(TrainConfig)}
