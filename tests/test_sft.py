"""Supervised fine-tuning: response-only loss, the env's prompt encoding, LoRA merged, bad input."""

import pytest
import torch

import lm_gym
from agents.sft import sft
from lm_gym.chat import encode_prompt
from lm_gym.data import FeedbackExample, PreferencePair

EXAMPLES = [(f"Say yes {i}.", "yes") for i in range(16)]


def greedy(model, tokenizer, prompt, steps):
    ids = encode_prompt(tokenizer, prompt, True)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def test_sft_teaches_the_response_as_the_env_will_ask_for_it():
    model, tokenizer, history = sft("tiny", EXAMPLES, lr=1e-2, epochs=12, batch_size=8, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] / 2
    target = tokenizer("yes", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert greedy(model, tokenizer, "Say yes 99.", len(target)) == target
    assert not any(p.requires_grad for p in model.parameters())


def test_the_loss_covers_only_response_tokens():
    model, tokenizer = lm_gym.load_model("tiny")
    prompt, response = EXAMPLES[0]
    prompt_ids = encode_prompt(tokenizer, prompt, True)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt_ids + response_ids])).logits[0], -1)
    expected = -torch.stack([logprobs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(response_ids)]).mean()
    _, _, history = sft(model, [EXAMPLES[0]], tokenizer=tokenizer, lr=0.0, progress=False)
    assert history[0]["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_pairs_feedback_and_lora_are_accepted():
    examples = [PreferencePair("Q?", "yes", "no"), FeedbackExample("Q?", "yes", 1.0)]
    model, _, history = sft("tiny", examples, lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                            lr=1e-3, progress=False)
    assert len(history) == 1 and not hasattr(model, "peft_config")


def test_bad_examples_are_named():
    with pytest.raises(ValueError, match="no examples"):
        sft("tiny", [], progress=False)
    with pytest.raises(TypeError, match="SFT example"):
        sft("tiny", ["just text"], progress=False)
    with pytest.raises(ValueError, match="no room for its response"):
        sft("tiny", EXAMPLES[:1], max_length=4, progress=False)
