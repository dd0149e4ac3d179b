"""The precision setting: names, the "auto" rule, and what bf16 keeps in float32."""

import json

import pytest
import torch

import lm_gym
from agents import LMPPO, TransformerActorCritic
from agents.sft import sft
from lm_gym import precision as precision_module
from lm_gym.precision import Precision, precision_name, resolve_precision
from lm_gym.sb3 import SB3VecEnv


@pytest.mark.parametrize("given, name", [("bf16", "bf16"), ("BF16", "bf16"), ("bfloat16", "bf16"),
                                         (torch.bfloat16, "bf16"), ("fp32", "fp32"), ("float32", "fp32"),
                                         (torch.float32, "fp32"), ("torch.float32", "fp32"), ("auto", "auto")])
def test_precision_names(given, name):
    assert precision_name(given) == name


@pytest.mark.parametrize("bad", ["fp8", "float16", torch.float16, "", "int8"])
def test_unknown_precisions_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="precision"):
        precision_name(bad)
    with pytest.raises(ValueError):
        lm_gym.LanguageModelEnv(model="tiny", precision=bad)


@pytest.fixture
def fresh_auto(monkeypatch, tmp_path):
    """A clean "auto" decision: empty cache directory, nothing announced or remembered yet."""
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    monkeypatch.setattr(precision_module, "_announced", set())
    precision_module._auto_cpu.cache_clear()
    yield tmp_path
    precision_module._auto_cpu.cache_clear()


def test_auto_on_a_cpu_without_bf16_instructions_is_fp32(fresh_auto, monkeypatch, capsys):
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: [])
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == "fp32" and "no bf16 instructions" in chosen.reason
    resolve_precision("auto", "cpu")
    assert capsys.readouterr().err.count("lm-gym precision: fp32") == 1  # printed once per process


@pytest.mark.parametrize("speedup, expected", [(4.0, "bf16"), (1.1, "fp32")])
def test_auto_on_a_bf16_cpu_follows_the_measured_speedup(fresh_auto, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision_module, "_matmul_seconds",
                        lambda dtype, size, repeats: 1.0 if dtype == torch.float32 else 1.0 / speedup)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == expected and f"{speedup:.1f}x" in chosen.reason and "avx512_bf16" in chosen.reason


def test_the_cpu_measurement_is_cached(fresh_auto, monkeypatch):
    calls = []

    def seconds(dtype, size, repeats):
        calls.append(dtype)
        return 1.0 if dtype == torch.float32 else 0.25

    monkeypatch.setattr(precision_module, "_matmul_seconds", seconds)
    assert precision_module.cpu_bf16_speedup() == pytest.approx(4.0)
    assert precision_module.cpu_bf16_speedup() == pytest.approx(4.0)
    assert len(calls) == 2  # one float32 and one bf16 measurement, then the cache
    assert list(json.loads((fresh_auto / "cpu_bf16_speedup.json").read_text()).values()) == [4.0]


def test_the_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("LM_GYM_PRECISION", "bf16")
    assert resolve_precision(None, "cpu").name == "bf16"
    assert resolve_precision("fp32", "cpu").name == "fp32"  # an explicit setting wins


def test_env_loads_its_lm_in_the_precision_and_keeps_given_models(tiny):
    env = lm_gym.LanguageModelEnv(model="tiny", precision="bf16")
    assert env.reference.model.dtype == torch.bfloat16
    model, tokenizer = tiny
    given = lm_gym.LanguageModelEnv(model=model, tokenizer=tokenizer, precision="auto")
    assert given.reference.model is model and model.dtype == torch.float32  # "auto" leaves a loaded model alone
    obs, _ = env.reset(seed=0)
    _, _, _, _, info = env.step(5)
    assert isinstance(info["ref_logprob"], float) and info["ref_logprob"] <= 0.0  # float32 log-probs


def test_bf16_policy_keeps_float32_master_weights_and_float32_outputs(tiny):
    model, tokenizer = lm_gym.load_model("tiny", device="cpu")
    actor_critic = TransformerActorCritic(model.requires_grad_(True), tokenizer, precision="bf16")
    assert all(p.dtype == torch.float32 for p in actor_critic.parameters())
    ids = torch.randint(0, 200, (2, 6))
    evaluation = actor_critic.evaluate(ids, torch.ones_like(ids), keep=3)
    assert evaluation.logits.dtype == evaluation.values.dtype == evaluation.hidden.dtype == torch.float32
    tokens, valid = ids[:, -2:], torch.ones(2, 2, dtype=torch.bool)
    scored = actor_critic(ids, torch.ones_like(ids), tokens, torch.tensor([[0, 1], [0, 1]]), valid)
    assert scored.logprobs.dtype == scored.values.dtype == torch.float32
    scored.logprobs.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in actor_critic.parameters())


def test_training_a_bf16_model_is_refused_with_guidance():
    model, tokenizer = lm_gym.load_model("tiny", device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match="float32 master weights"):
        TransformerActorCritic(model.requires_grad_(True), tokenizer)
    with pytest.raises(ValueError, match="float32 master weights"):
        sft(model, [("a", "b")], tokenizer=tokenizer, progress=False)


def test_bf16_lora_policy_shares_a_bf16_base_with_float32_adapters():
    env = SB3VecEnv(2, model="tiny", max_new_tokens=3, max_prompt_tokens=64, precision="bf16",
                    reward=lambda p, r, **c: [1.0] * len(r))
    agent = LMPPO(env=env, n_steps=3, batch_size=64, n_epochs=1, seed=0, device="cpu", precision="bf16",
                  policy_kwargs={"model": env.model, "tokenizer": env.tokenizer, "lora": {"r": 2, "lora_alpha": 4}})
    trainable = [p for p in agent.policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert agent.reference.model is env.model and env.model.dtype == torch.bfloat16
    agent.learn(6)
    assert agent.logger.name_to_value["train/value_loss"] >= 0.0


def test_lmppo_precision_conflicts_are_refused():
    env = SB3VecEnv(1, model="tiny", max_new_tokens=2, max_prompt_tokens=64)
    with pytest.raises(ValueError, match="conflicts with policy_kwargs"):
        LMPPO(env=env, precision="bf16", policy_kwargs={"model": "tiny", "precision": "fp32"})


def test_a_resolved_precision_prints_as_name_and_reason():
    assert str(Precision("bf16", "auto: because")) == "bf16 (auto: because)"
    assert Precision("fp32").autocast("cpu").__class__.__name__ == "nullcontext"


def test_a_bf16_lora_policy_acts_through_a_merged_copy_refreshed_after_updates():
    from agents.rollout_cache import RolloutCache

    model, tokenizer = lm_gym.load_model("tiny", device="cpu", dtype="bf16")
    actor_critic = TransformerActorCritic.from_pretrained(model, tokenizer, precision="bf16",
                                                          lora={"r": 2, "lora_alpha": 4, "init_lora_weights": False})
    ids = torch.randint(0, 200, (2, 6))
    mask = torch.ones_like(ids)
    cache = RolloutCache()
    with torch.no_grad():
        logits, _ = actor_critic.act(ids, mask, cache)
        expected = torch.log_softmax(actor_critic.evaluate(ids, mask).logits[:, -1], dim=-1)
        with actor_critic.lm.disable_adapter():
            base = torch.log_softmax(actor_critic.evaluate(ids, mask).logits[:, -1], dim=-1)
    runner = cache._backbones[id(actor_critic.lm)].batch.model
    assert runner is not actor_critic.lm and not hasattr(runner, "peft_config")  # a plain model, adapters merged
    assert (logits - expected).abs().max() < 0.2 * (base - expected).abs().max()  # the adapters are in it
    adapter = next(p for n, p in actor_critic.lm.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        adapter.add_(1.0)  # new weights: the next act makes a new merged copy
        actor_critic.act(ids, mask, cache)
    assert cache._backbones[id(actor_critic.lm)].batch.model is not runner
