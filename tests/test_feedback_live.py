"""FeedbackReward over a live store: it takes in new ratings incrementally, and a training run on the tiny
model (``TrainConfig.feedback_db``, the ``--feedback-db`` flag) uses ratings given through the API while it runs."""

import threading
import time

import httpx
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents import LMPPO
from agents.callbacks import RefreshRewardCallback
from agents.train import TrainConfig, run
from lm_gym.feedback.live import StoreFeedbackReward
from lm_gym.feedback.store import FeedbackStore, NewItem
from lm_gym.rewards import FeedbackReward
from lm_gym.sb3 import SB3VecEnv
from tests.feedback_servers import AppServer

ADMIN = "live-test-admin-token-0123456"


class CountingEncoder:
    """Bag-of-letters embeddings that count how many texts were embedded."""

    cache_key = "letters"
    device = "cpu"

    def __init__(self):
        self.embedded = []

    def encode(self, texts):
        self.embedded += texts
        return torch.tensor([[text.lower().count(c) + 0.01 for c in "abcdefghijklmnopqrstuvwxyz"] for text in texts])


def test_refresh_embeds_only_new_texts_and_updates_values(feedback_store, store_url):
    first, pair = feedback_store.add_items([NewItem("Describe the sea.", "blue and wide"),
                                            NewItem("Describe the sea.", "green", "grey")])
    ann, bob = feedback_store.invite("ann")[0], feedback_store.invite("bob")[0]
    encoder = CountingEncoder()
    reward = FeedbackReward.from_store(store_url, encoder=encoder, context_threshold=0.5)
    assert reward(["Describe the sea."], ["blue and wide"]).tolist() == [0.0]  # nothing rated yet
    feedback_store.record(ann, first, "single", 1.0)
    assert reward.refresh() == 1
    good = float(reward(["Describe the sea."], ["blue and wide"])[0])
    assert good == pytest.approx(1.0, abs=1e-5)
    feedback_store.record(bob, first, "single", -1.0)  # the mean vote falls to 0: no new text to embed
    embedded = len(encoder.embedded)
    reward.refresh()
    assert float(reward(["Describe the sea."], ["blue and wide"])[0]) == pytest.approx(0.0, abs=1e-6)
    assert len(encoder.embedded) == embedded + 2  # only the two query texts of this call
    feedback_store.record(ann, pair, "pair", -1.0)  # grey preferred over green
    assert reward.refresh() == 2
    assert [(e.response, e.feedback) for e in reward.examples()] == [
        ("blue and wide", 0.0), ("green", -1.0), ("grey", 1.0)]
    assert encoder.embedded[embedded + 2:embedded + 4] == ["green", "grey"]  # the prompt was embedded already
    assert [r["new"] for r in reward.refreshes] == [1, 0, 2]


class LoggedStoreReward(StoreFeedbackReward):
    """The live reward, logging each refresh and each scoring call with the number of rated responses its
    index then holds; ``scored`` counts the responses scored against a non-empty index (an empty one gives
    0 without embedding anything)."""

    def __init__(self, url, encoder):
        super().__init__(url, encoder=encoder)
        self.log, self.scored = [], 0

    def refresh(self):
        changed = super().refresh()
        self.log.append(("refresh", len(self.examples())))
        return changed

    def __call__(self, prompts, responses, **context):
        scores = super().__call__(prompts, responses, **context)
        self.log.append(("score", len(self.examples())))
        self.scored += len(responses) if self.examples() else 0
        return scores


class RateDuringRollout(BaseCallback):
    """Store a rating for the next item on the first step of every rollout: mid-rollout, after its refresh."""

    def __init__(self, store, rater, items):
        super().__init__()
        self.store, self.rater, self.items = store, rater, list(items)

    def _on_rollout_start(self):
        self.rate_now = True

    def _on_step(self):
        if self.rate_now and self.items:
            self.store.record(self.rater, self.items.pop(0), "single", 1.0)
        self.rate_now = False
        return True


def test_index_is_fixed_within_a_rollout_and_refreshed_between_rollouts(tiny, feedback_store, store_url):
    items = feedback_store.add_items([NewItem("Name a colour.", f"rated response {i}") for i in range(3)])
    rater = feedback_store.invite("ann")[0]
    encoder = CountingEncoder()
    reward = LoggedStoreReward(store_url, encoder)
    model, tokenizer = tiny
    env = SB3VecEnv(2, model=model, tokenizer=tokenizer, prompts=["Name a colour."], reward=reward,
                    max_new_tokens=3, max_prompt_tokens=32)
    agent = LMPPO(env=env, n_steps=9, batch_size=64, n_epochs=1, seed=0, device="cpu",
                  policy_kwargs={"model": "tiny", "optimizer_class": torch.optim.SGD})
    agent.learn(total_timesteps=3 * 9 * 2, callback=[RefreshRewardCallback(env), RateDuringRollout(
        feedback_store, rater, items)])
    rollouts, current = [], None
    for event, rated in reward.log:
        if event == "refresh":
            rollouts.append([])
            current = rated
        else:
            rollouts[-1].append(rated)
            assert rated == current  # no scoring call saw a rating stored during its rollout
    assert [len(calls) >= 3 for calls in rollouts] == [True] * 3  # several scoring calls per rollout
    assert [calls[0] for calls in rollouts] == [0, 1, 2]  # each rollout sees the ratings given before it
    rated_texts = [text for text in encoder.embedded if text.startswith("rated response")]
    assert rated_texts == ["rated response 0", "rated response 1"]  # each new response embedded once
    assert len(encoder.embedded) == 2 * reward.scored + 2 + 1  # query texts, two responses, one prompt


def test_training_run_uses_ratings_given_while_it_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    prompts = ["Say something kind.", "Name a colour.", "Tell me about cats.", "Describe the sea."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    rated = "The sea is wide, blue and calm today."
    (item,) = store.add_items([NewItem(prompts[-1], rated)])
    _, token = store.invite("ann")
    probe = FeedbackReward.from_store(url)
    assert probe([prompts[-1]], [rated]).tolist() == [0.0]
    config = TrainConfig(model="tiny", prompts=str(tmp_path / "prompts.txt"), feedback_db=url, alpha=1.0,
                         iterations=8, num_envs=2, max_new_tokens=4, eval_prompts=1, eval_samples=2, batch_size=8)
    result = {}
    training = threading.Thread(target=lambda: result.update(run(config, tmp_path / "run")))
    server = AppServer(url, ADMIN)
    server.start()
    try:
        training.start()
        while not (tmp_path / "run" / "metrics.csv").exists():  # the first iteration is done
            assert training.is_alive(), "training ended before the first iteration was written"
            time.sleep(0.05)
        answer = httpx.post(f"{server.url}/api/ratings", json={"item_id": item, "value": 1},
                            headers={"Authorization": f"Bearer {token}"})
        rated_while_training = training.is_alive()
        training.join(300)
    finally:
        server.stop()
    assert answer.status_code == 201 and rated_while_training
    probe.refresh()
    assert probe([prompts[-1]], [rated]).tolist() == [pytest.approx(1.0, abs=1e-4)]
    before, after = result["before"]["components"]["feedback"], result["after"]["components"]["feedback"]
    assert before == 0.0 and after != 0.0  # the run's own reward took in the rating given mid-run
