"""Pre-generated responses on the tiny model: batches through the vector env, settings stored with each item,
arena pairs in a random order, and ``lm-gym feedback sample``."""

import json

from agents.cli import main
from lm_gym.feedback.sampling import SamplingSettings, sample_arena, sample_items, sample_responses
from lm_gym.feedback.store import FeedbackStore

PROMPTS = ["Say hi.", [{"role": "user", "content": "Name a fruit."}], "Count to three.", "Tell a joke."]


def test_samples_do_not_depend_on_the_batch_size():
    settings = SamplingSettings(max_new_tokens=6, batch_size=3, seed=7)
    small = sample_items("tiny", PROMPTS, 2, settings)
    large = sample_items("tiny", PROMPTS, 2, SamplingSettings(max_new_tokens=6, batch_size=16, seed=7))
    assert [i.response_a for i in small] == [i.response_a for i in large]  # row i draws with seed + i
    assert [i.prompt for i in small] == [p for p in PROMPTS for _ in range(2)]
    assert len({i.response_a for i in small}) > 1
    assert small[3].sampling == {"model": "tiny", "max_new_tokens": 6, "temperature": 1.0, "max_prompt_tokens": 256,
                                 "batch_size": 3, "seed": 7, "row": 3}


def test_arena_pairs_hold_both_models_in_a_random_order(tiny, tmp_path):
    import torch

    model, tokenizer = tiny
    other = type(model)(model.config)
    other.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()})
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    settings = SamplingSettings(max_new_tokens=4, seed=3)
    prompts = [f"Question {i}?" for i in range(12)]
    pairs = sample_arena("tiny", tmp_path / "other", prompts, settings)
    alone = sample_responses("tiny", prompts, settings)
    assert all(p.kind == "pair" and {p.model_a, p.model_b} == {"tiny", str(tmp_path / "other")} for p in pairs)
    assert {p.model_a for p in pairs} == {"tiny", str(tmp_path / "other")}  # both models appear on the left
    tiny_side = [p.response_a if p.model_a == "tiny" else p.response_b for p in pairs]
    assert tiny_side == alone and [p.prompt for p in pairs] == prompts


def test_cli_sample_stores_responses_with_their_settings(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) if isinstance(p, str) else
                                                      json.dumps({"messages": p}) for p in PROMPTS) + "\n")
    db = ["--dir", str(tmp_path)]
    assert main(["feedback", "sample", "--model", "tiny", "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--responses-per-prompt", "2", "--max-new-tokens", "4", *db]) == 0
    assert "stored 8 responses for 4 prompts" in capsys.readouterr().out
    items = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}").items()
    assert len(items) == 8 and all(i.kind == "single" and json.loads(i.sampling)["max_new_tokens"] == 4 for i in items)
    assert json.loads(items[2].prompt) == PROMPTS[1]
