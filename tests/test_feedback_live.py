"""FeedbackReward over a live store: it takes in new ratings incrementally, and a training run on the tiny
model (``TrainConfig.feedback_db``, the ``--feedback-db`` flag) uses ratings given through the API while it runs."""

import threading
import time

import httpx
import pytest

from agents.train import TrainConfig, run
from lm_gym.feedback.store import FeedbackStore, NewItem
from lm_gym.rewards import FeedbackReward
from tests.feedback_servers import AppServer

ADMIN = "live-test-admin-token-0123456"


class CountingEncoder:
    """Bag-of-letters embeddings that count how many texts were embedded."""

    cache_key = "letters"
    device = "cpu"

    def __init__(self):
        self.embedded = []

    def encode(self, texts):
        import torch

        self.embedded += texts
        return torch.tensor([[text.lower().count(c) + 0.01 for c in "abcdefghijklmnopqrstuvwxyz"] for text in texts])


def test_refresh_embeds_only_new_texts_and_updates_values(feedback_store, store_url):
    first, pair = feedback_store.add_items([NewItem("Describe the sea.", "blue and wide"),
                                            NewItem("Describe the sea.", "green", "grey")])
    ann, bob = feedback_store.invite("ann")[0], feedback_store.invite("bob")[0]
    encoder = CountingEncoder()
    reward = FeedbackReward.from_store(store_url, poll_seconds=0, encoder=encoder, context_threshold=0.5)
    assert reward(["Describe the sea."], ["blue and wide"]).tolist() == [0.0]  # nothing rated yet
    feedback_store.record(ann, first, "single", 1.0)
    good = float(reward(["Describe the sea."], ["blue and wide"])[0])
    assert good == pytest.approx(1.0, abs=1e-5)
    feedback_store.record(bob, first, "single", -1.0)  # the mean vote falls to 0: no new text to embed
    embedded = len(encoder.embedded)
    assert float(reward(["Describe the sea."], ["blue and wide"])[0]) == pytest.approx(0.0, abs=1e-6)
    assert len(encoder.embedded) == embedded + 2  # only the two query texts of this call
    feedback_store.record(ann, pair, "pair", -1.0)  # grey preferred over green
    assert reward.refresh() == 2
    assert [(e.response, e.feedback) for e in reward.examples()] == [
        ("blue and wide", 0.0), ("green", -1.0), ("grey", 1.0)]
    assert encoder.embedded[embedded + 2:embedded + 4] == ["green", "grey"]  # the prompt was embedded already
    assert [r["new"] for r in reward.refreshes] == [1, 0, 2]


def test_training_run_uses_ratings_given_while_it_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    prompts = ["Say something kind.", "Name a colour.", "Tell me about cats.", "Describe the sea."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    rated = "The sea is wide, blue and calm today."
    (item,) = store.add_items([NewItem(prompts[-1], rated)])
    _, token = store.invite("ann")
    probe = FeedbackReward.from_store(url, poll_seconds=0)
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
    assert probe([prompts[-1]], [rated]).tolist() == [pytest.approx(1.0, abs=1e-4)]
    before, after = result["before"]["components"]["feedback"], result["after"]["components"]["feedback"]
    assert before == 0.0 and after != 0.0  # the run's own reward took in the rating given mid-run
