"""The feedback store on SQLite and on a real PostgreSQL server: schema version, tokens, the queue, judgements
and their idempotency, judgements stored together (record_many, group commit)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, update

from lm_gym.feedback.schema import SCHEMA_VERSION, Meta, Rating, Signal
from lm_gym.feedback.group_commit import GroupCommit
from lm_gym.feedback.store import Conflict, FeedbackStore, JudgementRequest, NewItem, NotFound, StoreError


def test_schema_version_is_recorded_and_a_newer_one_refused(store_url):
    store = FeedbackStore(store_url)
    assert store.schema_version() == SCHEMA_VERSION
    secret = store.secret
    store.close()
    again = FeedbackStore(store_url)  # reopening keeps the version and the form-signing secret
    assert again.schema_version() == SCHEMA_VERSION and again.secret == secret
    with again.writes.begin() as session:
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    again.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than the version {SCHEMA_VERSION} this lm-gym knows"):
        FeedbackStore(store_url)


def test_tokens_authenticate_only_their_role(feedback_store):
    rater_id, token = feedback_store.invite("ann")
    app_id, key = feedback_store.invite("shop", role="app")
    assert feedback_store.authenticate(token, "rater").id == rater_id
    assert feedback_store.authenticate(key, "app").id == app_id
    assert feedback_store.authenticate(key, "rater") is None and feedback_store.authenticate(token, "app") is None
    assert feedback_store.authenticate(token + "x", "rater") is None and feedback_store.authenticate("", "rater") is None
    assert all(token not in (r.token_hash, r.name) for r in feedback_store.raters())  # only the hash is stored
    with pytest.raises(StoreError, match="role='boss'"):
        feedback_store.invite("x", role="boss")


def test_queue_gives_each_item_the_configured_ratings_and_never_repeats(feedback_store):
    ids = feedback_store.add_items([NewItem(f"prompt {i}", f"response {i}") for i in range(3)])
    raters = [feedback_store.invite(f"r{i}")[0] for i in range(3)]
    seen = {rater: [] for rater in raters}
    for rater in raters:  # two ratings per item: the third rater finds only the item nobody has filled yet
        while (item := feedback_store.next_item(rater, ratings_per_item=2)) is not None:
            assert item.id not in seen[rater]
            seen[rater].append(item.id)
            feedback_store.record(rater, item.id, "single", 1.0)
    assert seen[raters[0]] == ids and seen[raters[1]] == ids and seen[raters[2]] == []
    assert feedback_store.progress(raters[0], 2) == (3, 0)


def test_least_rated_item_comes_first_and_skips_do_not_count(feedback_store):
    first, second = feedback_store.add_items([NewItem("p", "a"), NewItem("p", "b")])
    ann, bob = feedback_store.invite("ann")[0], feedback_store.invite("bob")[0]
    feedback_store.record(ann, first, "single", -1.0)
    assert feedback_store.next_item(bob, 3).id == second  # 0 ratings before 1
    feedback_store.record(bob, second, "skip", None)
    assert feedback_store.next_item(bob, 3).id == first  # skipped items are not shown again
    assert feedback_store.next_item(ann, 3).id == second  # a skip is no rating: second still has 0


def test_idempotency_key_stores_a_retry_once(feedback_store):
    (item,) = feedback_store.add_items([NewItem("p", "r")])
    rater = feedback_store.invite("ann")[0]
    rating, created = feedback_store.record(rater, item, "single", 1.0, "fine", 2.5, idempotency_key="k-1")
    again, created_again = feedback_store.record(rater, item, "single", 1.0, "fine", 2.5, idempotency_key="k-1")
    assert created and not created_again and again.id == rating.id
    assert feedback_store.count(Rating) == 1
    with pytest.raises(Conflict, match="Idempotency-Key was already used for another judgement"):
        feedback_store.record(rater, item, "single", -1.0, idempotency_key="k-1")
    with pytest.raises(Conflict, match="already judged item"):
        feedback_store.record(rater, item, "single", -1.0, idempotency_key="k-2")
    assert feedback_store.count(Rating) == 1


def test_concurrent_retries_of_one_key_store_one_row(feedback_store):
    items = feedback_store.add_items([NewItem("p", f"r{i}") for i in range(20)])
    rater = feedback_store.invite("ann")[0]

    def post(item):
        return feedback_store.record(rater, item, "single", 1.0, idempotency_key=f"key-{item}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, items * 4))  # each key sent four times, concurrently
    assert feedback_store.count(Rating) == 20
    assert sum(created for _, created in results) == 20
    assert {rating.item_id for rating, _ in results} == set(items)


def test_judgements_must_fit_the_item(feedback_store):
    single, pair = feedback_store.add_items([NewItem("p", "r"), NewItem("p", "x", "y")])
    rater = feedback_store.invite("ann")[0]
    with pytest.raises(NotFound, match="no item with id 999"):
        feedback_store.record(rater, 999, "single", 1.0)
    with pytest.raises(StoreError, match="it takes a comparison"):
        feedback_store.record(rater, pair, "single", 1.0)
    with pytest.raises(StoreError, match=r"it takes a rating \(\+1/-1\)"):
        feedback_store.record(rater, single, "pair", 0.0)
    with pytest.raises(StoreError, match="comment contains a NUL character"):
        feedback_store.record(rater, single, "single", 1.0, comment="a\x00b")
    assert feedback_store.count(Rating) == 0


def test_text_round_trips_exactly(feedback_store):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode ✓ <b>\x00 ok"}]
    response = "line one\n\n  <script>alert(1)</script> " + "long " * 5000
    (item_id,) = feedback_store.add_items([NewItem(prompt, response, sampling={"temperature": 0.7})])
    item = feedback_store.item(item_id)
    import json

    assert json.loads(item.prompt) == prompt and item.response_a == response
    assert json.loads(item.sampling) == {"temperature": 0.7}
    with pytest.raises(StoreError, match="response_a contains a NUL character"):
        feedback_store.add_items([NewItem("p", "bad\x00")])


def test_signals_add_the_item_once_and_are_idempotent(feedback_store):
    app = feedback_store.invite("shop", role="app")[0]
    first, created = feedback_store.record_signal(app, "Hi", "Hello!", "like", "user-1", "s-1")
    retry, created_again = feedback_store.record_signal(app, "Hi", "Hello!", "like", "user-1", "s-1")
    other, _ = feedback_store.record_signal(app, "Hi", "Hello!", "click", "user-2")
    assert created and not created_again and retry.id == first.id
    assert other.item_id == first.item_id and feedback_store.count(Signal) == 2
    assert feedback_store.item(first.item_id).source == "signal"
    with pytest.raises(StoreError, match="signal='love'"):
        feedback_store.record_signal(app, "Hi", "Hello!", "love")


def test_record_many_sorts_out_each_judgement_of_one_transaction(feedback_store):
    single, other, pair = feedback_store.add_items([NewItem("p", "a"), NewItem("p", "b"), NewItem("p", "x", "y")])
    ann, bob = feedback_store.invite("ann")[0], feedback_store.invite("bob")[0]
    outcomes = feedback_store.record_many([
        JudgementRequest(ann, single, "single", 1.0, "ok", idempotency_key="k-1"),
        JudgementRequest(ann, single, "single", 1.0, "ok", idempotency_key="k-1"),  # its retry, in the same batch
        JudgementRequest(ann, single, "single", -1.0, idempotency_key="k-2"),  # a second judgement of the item
        JudgementRequest(bob, single, "single", 1.0, "a\x00b"),
        JudgementRequest(bob, 999, "single", 1.0),
        JudgementRequest(bob, pair, "single", 1.0),
        JudgementRequest(bob, other, "skip", None),
    ])
    (first, created), (retry, created_again) = outcomes[0], outcomes[1]
    assert created and not created_again and retry.id == first.id
    assert isinstance(outcomes[2], Conflict) and "already judged item" in str(outcomes[2])
    assert "NUL character" in str(outcomes[3]) and isinstance(outcomes[4], NotFound)
    assert "it takes a comparison" in str(outcomes[5])
    assert outcomes[6][1] and outcomes[6][0].value is None  # the refused ones did not hold it back
    assert [(r.rater_id, r.item_id, r.value) for r in feedback_store.ratings()] == [(ann, single, 1.0), (bob, other, None)]


def test_group_commit_stores_concurrent_requests_in_few_transactions(feedback_store):
    items = feedback_store.add_items([NewItem("p", f"r{i}") for i in range(100)])
    rater = feedback_store.invite("ann")[0]
    commits = []
    event.listen(feedback_store.engine, "commit", lambda connection: commits.append(1))
    group = GroupCommit(feedback_store)

    async def post_all():
        return await asyncio.gather(*(group.record(JudgementRequest(rater, item, "single", 1.0, idempotency_key=f"k{item}"))
                                      for item in items + items[:10]))  # ten retries among them

    results = asyncio.run(post_all())
    assert feedback_store.count(Rating) == 100 and sum(created for _, created in results) == 100
    assert [rating.item_id for rating, _ in results] == items + items[:10]
    assert len(commits) <= 5  # one transaction per batch, not one per request
