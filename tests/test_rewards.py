"""Rewards: the feedback formula by hand, blends, model rewards, shaping, non-finite scores."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lm_gym.data import FeedbackExample
from lm_gym.reference import ReferenceModel
from lm_gym.rewards import (
    BlendedReward,
    FeedbackReward,
    FluencyReward,
    FunctionReward,
    LengthPenalty,
    LMEncoder,
    LMJudgeReward,
    MissingEOSPenalty,
    RepetitionPenalty,
    RewardModelReward,
    WeightedSum,
)
from tests.conftest import full_forward_logprobs


class TableEncoder:
    """Embeddings looked up from a fixed table, so the formula can be checked by hand."""

    cache_key = "table"

    def __init__(self, table):
        self.table = {text: torch.tensor(vector, dtype=torch.float32) for text, vector in table.items()}
        self.device = torch.device("cpu")

    def encode(self, texts):
        return torch.stack([self.table[text] for text in texts])


TABLE = {
    "p1": [1.0, 0.0, 0.0], "p2": [0.8, 0.6, 0.0], "p3": [0.0, 0.0, 1.0],   # feedback prompts
    "a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.6, 0.8, 0.0], "d": [0.0, 0.0, 2.0],  # feedback responses
    "q": [1.0, 0.0, 0.0], "far": [0.0, -1.0, 0.0],                        # queried prompts
    "y": [0.0, 3.0, 4.0],                                                  # queried response
}
FEEDBACK = [FeedbackExample("p1", "a", 1.0), FeedbackExample("p1", "b", -1.0),
            FeedbackExample("p2", "c", 0.5), FeedbackExample("p3", "d", 1.0)]


def feedback_reward(**kwargs):
    return FeedbackReward(FEEDBACK, encoder=TableEncoder(TABLE), cache=False, **kwargs)


def cosine(u, v):
    u, v = np.asarray(TABLE[u]), np.asarray(TABLE[v])
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def test_feedback_reward_matches_the_formula_by_hand():
    # prompt "q": cos(q,p1)=1, cos(q,p2)=0.8, cos(q,p3)=0. Threshold 0.5 keeps the items of p1 and p2.
    expected = (1.0 * cosine("y", "a") - 1.0 * cosine("y", "b") + 0.5 * cosine("y", "c")) / 3
    assert feedback_reward(top_m=8, context_threshold=0.5)(["q"], ["y"]).item() == pytest.approx(expected, abs=1e-6)
    # top_m=2 keeps the two items whose prompt is nearest (both of p1).
    expected = (cosine("y", "a") - cosine("y", "b")) / 2
    assert feedback_reward(top_m=2, context_threshold=0.5)(["q"], ["y"]).item() == pytest.approx(expected, abs=1e-6)
    # a threshold above 0.8 leaves only p1's items
    got = feedback_reward(top_m=8, context_threshold=0.9)(["q"], ["y"]).item()
    assert got == pytest.approx((cosine("y", "a") - cosine("y", "b")) / 2, abs=1e-6)


def test_feedback_reward_is_zero_without_a_similar_prompt():
    scores = feedback_reward(context_threshold=0.5)(["far", "q"], ["y", "y"])
    assert scores[0].item() == 0.0 and scores[1].item() != 0.0


def test_feedback_reward_l2_and_callable_similarity():
    y = np.asarray(TABLE["y"])
    distance = {r: float(np.linalg.norm(y - np.asarray(TABLE[r]))) for r in "abc"}
    expected = (-distance["a"] + distance["b"] - 0.5 * distance["c"]) / 3
    assert feedback_reward(similarity="l2")(["q"], ["y"]).item() == pytest.approx(expected, abs=1e-5)
    constant = feedback_reward(similarity=lambda answers, items: torch.ones(items.shape[:2]))
    assert constant(["q"], ["y"]).item() == pytest.approx((1.0 - 1.0 + 0.5) / 3, abs=1e-6)


def test_feedback_reward_rejects_bad_settings():
    with pytest.raises(ValueError, match="similarity"):
        feedback_reward(similarity="dot")
    with pytest.raises(ValueError, match="top_m"):
        feedback_reward(top_m=0)
    with pytest.raises(ValueError, match="at least one"):
        FeedbackReward([], encoder=TableEncoder(TABLE))


def test_feedback_embeddings_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    encoder = TableEncoder(TABLE)
    calls = []
    original = encoder.encode
    encoder.encode = lambda texts: calls.append(len(texts)) or original(texts)
    first = FeedbackReward(FEEDBACK, encoder=encoder)(["q"], ["y"])
    second = FeedbackReward(FEEDBACK, encoder=encoder)(["q"], ["y"])
    assert torch.equal(first, second)
    assert calls == [3, 4, 1, 1, 1, 1]  # distinct feedback prompts and responses embedded once, queries each call
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 2


def test_default_sentence_encoder_ranks_the_shipped_feedback():
    reward = FeedbackReward("default")
    good = "Paris is the capital of France."
    scores = reward(["What is the capital of France?"] * 2, [good, "I do not care, look it up yourself."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_lm_encoder_feedback_reward_binds_to_the_env_lm(tiny):
    model, tokenizer = tiny
    reward = FeedbackReward(FEEDBACK[:2], encoder="lm", context_threshold=-1.0, cache=False)
    with pytest.raises(RuntimeError, match="bound"):
        reward(["p1"], ["a"])
    reward.bind(ReferenceModel(model, tokenizer))
    assert isinstance(reward.encoder, LMEncoder)
    assert reward(["p1"], ["a"]).shape == (1,)


def test_blended_reward_is_the_convex_combination():
    r_f = FunctionReward(lambda p, r, **c: [len(x) for x in r], name="feedback")
    r_m = FunctionReward(lambda p, r, **c: [x.count("a") for x in r], name="model")
    responses = ["banana", "kiwi", "a"]
    for alpha in (0.0, 0.3, 1.0):
        output = BlendedReward(r_f, r_m, alpha).evaluate(["?"] * 3, responses)
        expected = [alpha * len(x) + (1 - alpha) * x.count("a") for x in responses]
        assert output.total.tolist() == pytest.approx(expected)
        assert output.components["feedback"].tolist() == [6, 4, 1]
        assert output.components["model"].tolist() == [3, 0, 1]
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            BlendedReward(r_f, r_m, alpha)


def test_weighted_sum_with_running_normalisation():
    values = FunctionReward(lambda p, r, **c: [float(x) for x in r], name="value")
    total = WeightedSum([(2.0, values), (1.0, lambda p, r, **c: [1.0] * len(r))], normalize=True)
    output = total.evaluate(["?"] * 4, ["1", "2", "3", "4"])
    standardised = (torch.tensor([1.0, 2, 3, 4]) - 2.5) / torch.tensor([1.0, 2, 3, 4]).std(unbiased=False)
    assert output.total.tolist() == pytest.approx((2 * standardised).tolist(), abs=1e-2)  # constant term -> ~0
    assert set(output.components) == {"value", "<lambda>"}


def test_nonfinite_scores_raise_or_are_replaced():
    nan = FunctionReward(lambda p, r, **c: [math.nan] * len(r), name="broken")
    with pytest.raises(ValueError, match=r"'broken' returned nan for response 'hello'"):
        BlendedReward(nan, FunctionReward(lambda p, r, **c: [0.0]), 0.5).evaluate(["?"], ["hello"])
    patched = FunctionReward(lambda p, r, **c: [math.inf] * len(r), name="inf", nonfinite=-1.0)
    assert patched.evaluate(["?"], ["x"]).total.tolist() == [-1.0]


def test_fluency_reward_from_context_or_from_the_lm(tiny):
    model, tokenizer = tiny
    reward = FluencyReward()
    assert reward(["?"], ["x"], ref_logprobs=[torch.tensor([-1.0, -3.0])]).item() == -2.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        reward(["?"], ["x"])
    reward.bind(ReferenceModel(model, tokenizer))
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                               add_generation_prompt=True)
    prefix = tokenizer(prompt_ids, add_special_tokens=False).input_ids
    response = tokenizer("hello there", add_special_tokens=False).input_ids
    expected = np.mean([full_forward_logprobs(model, prefix + response[:i])[response[i]].item()
                        for i in range(len(response))])
    assert reward(["Hi"], ["hello there"]).item() == pytest.approx(expected, abs=1e-4)


def test_lm_judge_scores_yes_with_the_bound_lm(tiny):
    model, tokenizer = tiny
    judge = LMJudgeReward(yes="yes", no="no")
    with pytest.raises(RuntimeError, match="needs an LM"):
        judge(["?"], ["x"])
    judge.bind(ReferenceModel(model, tokenizer))
    scores = judge(["Name a fruit.", "Name a fruit."], ["apple", "rock"])
    text = judge.judge_prompt.format(prompt="Name a fruit.", response="apple")
    ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False).input_ids
    logprobs = full_forward_logprobs(model, ids)
    yes, no = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    assert scores[0].item() == pytest.approx((logprobs[yes] - logprobs[no]).item(), abs=1e-4)
    with pytest.raises(ValueError, match="judge_prompt"):
        LMJudgeReward("Rate this: {response}")


def test_reward_model_reward_loads_a_directory_with_statistics(tmp_path, tiny):
    _, tokenizer = tiny
    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    raw = RewardModelReward(tmp_path, device="cpu")
    scores = raw(["Hi", "Hi", "Bye"], ["hello", "hello", "a much longer answer here"])
    assert scores.shape == (3,) and scores[0] == pytest.approx(scores[1].item())
    with pytest.raises(ValueError, match="reward_stats.json"):
        RewardModelReward(tmp_path, normalize=True)
    (tmp_path / "reward_stats.json").write_text('{"mean": 1.0, "std": 2.0}')
    normalised = RewardModelReward(tmp_path, normalize=True, device="cpu")(["Hi"], ["hello"])
    assert normalised.item() == pytest.approx((scores[0].item() - 1.0) / 2.0, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModelReward(tmp_path / "missing")


def test_shaping_terms():
    assert MissingEOSPenalty()(["?"] * 2, ["a", "b"], stopped=[True, False]).tolist() == [0.0, -1.0]
    assert LengthPenalty(target=4)(["?"] * 2, ["", ""], response_ids=[[1] * 3, [1] * 6]).tolist() == [0.0, -0.5]
    repeated = RepetitionPenalty(n=2)(["?"] * 2, ["", ""], response_ids=[[1, 2, 3, 4], [1, 2, 1, 2, 1, 2]])
    assert repeated.tolist() == pytest.approx([0.0, -0.6])


def test_env_reports_each_component_and_passes_context(make_tiny_env):
    reward = WeightedSum([(1.0, FluencyReward()), (0.5, MissingEOSPenalty()), (0.1, LengthPenalty(target=2))])
    env = make_tiny_env(reward=reward, max_new_tokens=3)
    env.reset(seed=0)
    for _ in range(3):
        _, total, terminated, truncated, info = env.step(9)
    parts = info["reward_components"]
    assert set(parts) == {"fluency", "missing_eos", "length"} and parts["missing_eos"] == -1.0
    assert parts["length"] == pytest.approx(-0.5)
    assert total == pytest.approx(parts["fluency"] - 0.5 - 0.05, abs=1e-6)


def test_faiss_index_gives_the_exact_result():
    exact = feedback_reward(top_m=2)(["q", "far"], ["y", "y"])
    approximate = feedback_reward(top_m=2, index="faiss")(["q", "far"], ["y", "y"])
    assert torch.allclose(exact, approximate, atol=1e-5)


def test_default_env_reward_blends_feedback_and_fluency(make_tiny_env):
    env = make_tiny_env(max_new_tokens=2)
    env.reset(seed=0)
    env.step(9)
    _, total, _, _, info = env.step(9)
    parts = info["reward_components"]
    assert set(parts) == {"feedback", "fluency"}
    assert total == pytest.approx(0.5 * parts["feedback"] + 0.5 * parts["fluency"], abs=1e-6)
