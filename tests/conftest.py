import os

import numpy as np
import pytest
import torch

# The suite's default precision: float32, where the equivalence tests hold to 1e-5. Tests of bf16 and of
# "auto" ask for them explicitly; LM_GYM_PRECISION=bf16 runs everything else in bf16 too.
os.environ.setdefault("LM_GYM_PRECISION", "fp32")

import lm_gym  # noqa: E402
from lm_gym import LanguageModelEnv  # noqa: E402
from tests.feedback_fixtures import feedback_store, postgres_base, store_url  # noqa: E402,F401  (feedback databases)


@pytest.fixture(scope="session")
def tiny():
    """The tiny model and tokenizer, loaded once (the env never changes the weights)."""
    return lm_gym.load_model("tiny", device="cpu")


@pytest.fixture
def make_tiny_env(tiny):
    """Factory of single envs on the tiny model with short episodes; keywords override the defaults."""
    model, tokenizer = tiny
    created = []

    def make(**kwargs):
        settings = dict(model=model, tokenizer=tokenizer, max_new_tokens=6, max_prompt_tokens=64)
        settings.update(kwargs)
        env = LanguageModelEnv(**settings)
        created.append(env)
        return env

    yield make
    for env in created:
        env.close()


def full_forward_logprobs(model, ids) -> torch.Tensor:
    """log-softmax of the next-token logits after ``ids``, from one forward over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.as_tensor([ids], device=model.device)).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def observed_tokens(obs) -> list[int]:
    """The token ids an observation holds (its attention mask marks them)."""
    return obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()


def stop_id(env) -> int:
    return int(env.unwrapped.episodes.stop_token_ids[0])


def reset_prompt(env, **reset_kwargs) -> str:
    """The prompt of a fresh (single-turn) episode: reset, stop at once, read the last step's ``prompt_text``."""
    _, info = env.reset(**reset_kwargs)
    assert info == {}
    *_, info = env.step(stop_id(env))
    return info["prompt_text"]


def play(env, actions, seed=0, prompt=None):
    """Reset with ``seed`` and step ``actions`` until the episode ends; return (observations, steps)."""
    obs, info = env.reset(seed=seed, options={"prompt": prompt} if prompt else None)
    observations, steps = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        steps.append((reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return observations, steps


def assert_same_observations(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
