"""Integration tests on the embedded default model (SmolLM2-135M-Instruct): fetched and converted once."""

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import lm_gym
from lm_gym import models
from tests.conftest import full_forward_logprobs, observed_tokens

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    return lm_gym.load_model("default", device="cpu")


def test_default_model_is_smollm2(default_model):
    model, tokenizer = default_model
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.get_output_embeddings().weight.shape[0] == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    source = json.loads((models.default_model_dir() / "lm_gym_source.json").read_text())
    assert source["sha256"] == models.DEFAULT_GGUF_SHA256


def test_second_load_uses_the_cache_not_the_gguf(default_model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached default model was not used: the GGUF was located or converted again")

    monkeypatch.setattr(models, "_convert_gguf", fail)
    monkeypatch.setattr(models, "_locate_default_gguf", fail)
    model, _ = lm_gym.load_model("default", device="cpu")
    ids = torch.tensor([[1, 4093, 198, 1780]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, default_model[0](ids).logits)


def test_default_model_answers_sensibly(default_model):
    model, tokenizer = default_model
    env = lm_gym.LanguageModelEnv(model=model, tokenizer=tokenizer, max_new_tokens=12)
    env.reset(options={"prompt": "What is the capital of France?"})
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(int(env.next_token_logprobs().argmax()))
        done = terminated or truncated
    assert "Paris" in info["response_text"]


@pytest.mark.parametrize("multi_turn", [None, dict(max_turns=2, context_tokens=200, max_reply_tokens=8)])
def test_checkers_pass_on_the_default_model(default_model, multi_turn):
    model, tokenizer = default_model
    env = gym.make(
        "LanguageModelEnv-v0", model=model, tokenizer=tokenizer, max_new_tokens=8, multi_turn=multi_turn,
        render_mode="ansi",
    ).unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        gym_check_env(env)
    sb3_check_env(env, warn=True)


def test_ref_logprob_on_the_default_model(default_model):
    model, tokenizer = default_model
    env = lm_gym.LanguageModelEnv(model=model, tokenizer=tokenizer, max_new_tokens=6)
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(6):
        action = int(rng.integers(env.action_space.n))
        expected = full_forward_logprobs(model, observed_tokens(obs))[action].item()
        obs, _, terminated, truncated, info = env.step(action)
        assert info["ref_logprob"] == pytest.approx(expected, abs=1e-4)
        if terminated or truncated:
            break


def test_make_in_a_fresh_interpreter_gives_the_default_env(default_model):
    code = (
        "import gymnasium as gym; env = gym.make('lm_gym:LanguageModelEnv-v0', max_new_tokens=3);"
        "obs, info = env.reset(seed=0); assert env.action_space.n == 49152;"
        "done = False\nwhile not done:\n    obs, r, te, tr, info = env.step(198); done = te or tr\n"
        "print(info['response_text'].count(chr(10)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "3"  # token 198 is a newline


def test_rollout_command_on_the_default_model(default_model):
    result = subprocess.run(
        [sys.executable, "-m", "agents.cli", "rollout", "--episodes", "2", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("--- episode") == 2 and "tokens/s" in result.stdout
