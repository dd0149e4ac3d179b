"""The HTTP API and the form posts on both databases: authentication, validation (a 4xx naming what was
wrong, nothing written), idempotent retries, CSRF, escaping and the published OpenAPI schema."""

import json
import re

import httpx
import pytest
from fastapi.testclient import TestClient

from lm_gym.feedback.schema import Rating, Signal
from lm_gym.feedback.store import FeedbackStore, NewItem, hash_token
from lm_gym.feedback.web import create_app
from tests.feedback_servers import AppServer

ADMIN = "admin-token-for-tests-0123456789"


@pytest.fixture
def app_setup(feedback_store):
    single, pair = feedback_store.add_items([NewItem("Say hi", "Hi!"), NewItem("Pick", "left", "right", "m1", "m2")])
    _, ann = feedback_store.invite("ann")
    _, bob = feedback_store.invite("bob")
    _, key = feedback_store.invite("shop", role="app")
    client = TestClient(create_app(feedback_store, ADMIN, ratings_per_item=2))
    return client, feedback_store, {"single": single, "pair": pair, "ann": ann, "bob": bob, "key": key}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_rating_comparison_and_retry(app_setup):
    client, store, ids = app_setup
    first = client.post("/api/ratings", json={"item_id": ids["single"], "value": -1, "comment": "rude"},
                        headers={**bearer(ids["ann"]), "Idempotency-Key": "a-1"})
    retry = client.post("/api/ratings", json={"item_id": ids["single"], "value": -1, "comment": "rude"},
                        headers={**bearer(ids["ann"]), "Idempotency-Key": "a-1"})
    assert first.status_code == 201 and first.json()["created"] is True
    assert retry.status_code == 200 and retry.json() == {**first.json(), "created": False}
    compared = client.post("/api/comparisons", json={"item_id": ids["pair"], "choice": "b"}, headers=bearer(ids["ann"]))
    assert compared.status_code == 201 and compared.json()["value"] == -1.0
    rows = store.ratings()
    assert [(r.item_id, r.value, r.comment) for r in rows] == [(ids["single"], -1.0, "rude"), (ids["pair"], -1.0, "")]


def test_next_item_then_nothing_left(app_setup):
    client, _, ids = app_setup
    item = client.get("/api/items/next", headers=bearer(ids["bob"])).json()
    assert item == {"id": ids["single"], "kind": "single", "prompt": "Say hi", "responses": ["Hi!"]}
    client.post("/api/skips", json={"item_id": ids["single"]}, headers=bearer(ids["bob"]))
    client.post("/api/comparisons", json={"item_id": ids["pair"], "choice": "tie"}, headers=bearer(ids["bob"]))
    assert client.get("/api/items/next", headers=bearer(ids["bob"])).status_code == 204


BAD_REQUESTS = [
    ("malformed JSON", dict(content=b'{"item_id": 1, "value": ', headers={"Content-Type": "application/json"}),
     422, "JSON decode error"),
    ("value outside the allowed ones", dict(json={"item_id": 0, "value": 2}), 422, "Input should be 1 or -1"),
    ("a boolean value", dict(json={"item_id": 0, "value": True}), 422, "value must be the number 1 or -1, got true"),
    ("unknown item", dict(json={"item_id": 987654, "value": 1}), 404, "no item with id 987654"),
    ("oversized comment", dict(json={"item_id": 0, "value": 1, "comment": "x" * 2001}), 422,
     "String should have at most 2000 characters"),
    ("an unknown field", dict(json={"item_id": 0, "value": 1, "score": 1}), 422, "Extra inputs are not permitted"),
    ("NUL in the comment", dict(json={"item_id": 0, "value": 1, "comment": "a\u0000"}), 400,
     "comment contains a NUL character"),
]


@pytest.mark.parametrize("case, request_kwargs, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_refused_with_a_message_and_nothing_written(app_setup, case, request_kwargs, status, message):
    client, store, ids = app_setup
    kwargs = dict(request_kwargs)
    if "json" in kwargs and kwargs["json"]["item_id"] == 0:
        kwargs["json"] = {**kwargs["json"], "item_id": ids["single"]}
    kwargs["headers"] = {**kwargs.get("headers", {}), **bearer(ids["ann"])}
    answer = client.post("/api/ratings", **kwargs)
    assert answer.status_code == status, answer.text
    assert message in answer.text
    assert store.count(Rating) == 0


@pytest.mark.parametrize("credential, message", [
    (None, "missing rater token"),
    ("not-a-token", "unknown rater token"),
    ("key", "unknown rater token"),
    (ADMIN, "unknown rater token"),
], ids=["missing", "wrong", "an app's key", "the admin token"])
def test_rater_endpoints_need_a_rater_token(app_setup, credential, message):
    client, store, ids = app_setup
    headers = {} if credential is None else bearer(ids.get(credential, credential))
    for method, path, body in [("post", "/api/ratings", {"item_id": ids["single"], "value": 1}),
                               ("post", "/api/comparisons", {"item_id": ids["pair"], "choice": "a"}),
                               ("get", "/api/items/next", None)]:
        answer = client.request(method.upper(), path, json=body, headers=headers)
        assert answer.status_code == 401 and message in answer.json()["detail"], (path, answer.text)
    assert store.count(Rating) == 0


def test_signals_need_an_api_key_and_are_idempotent(app_setup):
    client, store, ids = app_setup
    body = {"prompt": [{"role": "user", "content": "Hi"}], "response": "Hello", "signal": "like", "user": "u1"}
    assert client.post("/api/signals", json=body).status_code == 401
    assert "unknown API key" in client.post("/api/signals", json=body, headers={"X-API-Key": ids["ann"]}).text
    headers = {"X-API-Key": ids["key"], "Idempotency-Key": "evt-9"}
    assert client.post("/api/signals", json=body, headers=headers).status_code == 201
    assert client.post("/api/signals", json=body, headers=headers).json()["created"] is False
    wrong = client.post("/api/signals", json={**body, "signal": "love"}, headers={"X-API-Key": ids["key"]})
    assert wrong.status_code == 422 and "'like', 'dislike' or 'click'" in wrong.text
    assert store.count(Signal) == 1


def test_admin_api_needs_the_admin_token(app_setup):
    client, _, ids = app_setup
    assert client.get("/api/admin/stats").status_code == 401
    assert client.get("/api/admin/stats", headers=bearer(ids["ann"])).status_code == 401
    stats = client.get("/api/admin/stats", headers=bearer(ADMIN)).json()
    assert stats["n_items"] == 2 and [r["name"] for r in stats["raters"]] == ["ann", "bob"]


def test_openapi_schema_is_published(app_setup):
    client, _, _ = app_setup
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/ratings", "/api/comparisons", "/api/skips", "/api/signals", "/api/items/next"} <= set(paths)


def sign_in(client, token):
    page = client.get(f"/r/{token}")
    assert page.status_code == 200 and page.url.path == "/rate"
    return page


def form_fields(page_html):
    return dict(re.findall(r'name="(csrf|shown)" value="([^"]+)"', page_html))


def test_form_post_records_a_rating_with_its_time(app_setup):
    client, store, ids = app_setup
    fields = form_fields(sign_in(client, ids["ann"]).text)
    done = client.post(f"/rate/{ids['single']}", data={**fields, "choice": "good", "comment": "nice"})
    assert done.status_code == 200 and done.url.path == "/rate"
    (rating,) = store.ratings()
    assert (rating.value, rating.comment) == (1.0, "nice") and 0 <= rating.seconds < 60


def test_form_posts_are_csrf_protected(app_setup):
    client, store, ids = app_setup
    ann_fields = form_fields(sign_in(client, ids["ann"]).text)
    other = TestClient(client.app)
    sign_in(other, ids["bob"])
    stolen = other.post(f"/rate/{ids['single']}", data={**ann_fields, "choice": "bad"})  # ann's token, bob's session
    assert stolen.status_code == 403 and "csrf token does not belong to this session" in stolen.text
    missing = other.post(f"/rate/{ids['single']}", data={"choice": "bad", "shown": ann_fields["shown"]})
    assert missing.status_code == 422 and "csrf" in missing.text
    anonymous = TestClient(client.app).post(f"/rate/{ids['single']}", data={**ann_fields, "choice": "bad"})
    assert anonymous.status_code == 401
    assert store.count(Rating) == 0


def test_pages_escape_model_text_and_need_a_token(app_setup):
    client, store, ids = app_setup
    evil = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
    store.add_items([NewItem(evil, evil)])
    eve, token = store.invite("eve")
    store.record(eve, ids["single"], "skip", None)
    store.record(eve, ids["pair"], "skip", None)
    assert TestClient(client.app).get("/rate").status_code == 403
    assert "not valid" in TestClient(client.app).get("/r/nope").text
    html = sign_in(client, token).text
    assert "<script>window" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
    assert "default-src 'none'" in client.get("/rate").headers["content-security-policy"]


def test_admin_page_invites_with_csrf(app_setup):
    client, store, _ = app_setup
    assert client.get("/admin").status_code == 403
    page = client.get(f"/a/{ADMIN}")
    assert page.status_code == 200 and "Invite a rater" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    assert client.post("/admin/invite", data={"name": "carol", "csrf": "0" * 64}).status_code == 403
    invited = client.post("/admin/invite", data={"name": "carol", "csrf": csrf})
    link = re.search(r'id="invite-link">([^<]+)<', invited.text).group(1)
    assert [r.name for r in store.raters()][-1] == "carol"
    assert store.authenticate(link.rsplit("/", 1)[1], "rater").name == "carol"


def test_oversized_bodies_and_out_of_range_ids_are_refused(app_setup):
    client, store, ids = app_setup
    huge = client.post("/api/ratings", content=b"x" * 1_000_001, headers={**bearer(ids["ann"]),
                       "Content-Type": "application/json"})
    assert huge.status_code == 413 and "the limit is 1000000" in huge.text
    big_id = client.post("/api/ratings", json={"item_id": 2**31, "value": 1}, headers=bearer(ids["ann"]))
    assert big_id.status_code == 422 and "less than or equal to 2147483647" in big_id.text
    sign_in(client, ids["ann"])
    assert client.post(f"/rate/{2**31}", data={"choice": "good", "csrf": "x", "shown": "y"}).status_code == 422
    assert store.count(Rating) == 0


def _chunks(body: bytes, size: int):
    """``body`` as an iterable of ``size``-byte pieces: httpx sends it chunked, without Content-Length."""
    return (body[start:start + size] for start in range(0, len(body), size))


def test_chunked_bodies_count_against_the_size_limit(feedback_store, store_url):
    (item,) = feedback_store.add_items([NewItem("Say hi", "Hi!")])
    _, token = feedback_store.invite("ann")
    server = AppServer(store_url, ADMIN)
    server.start()
    huge_body = json.dumps({"item_id": item, "value": 1, "comment": "x" * 1_200_000}).encode()
    try:
        with httpx.Client(base_url=server.url, headers={**bearer(token), "Content-Type": "application/json"}) as http:
            huge = http.post("/api/ratings", content=_chunks(huge_body, 65_536))
            small = http.post("/api/ratings", content=_chunks(json.dumps({"item_id": item, "value": 1}).encode(), 7))
    finally:
        server.stop()
    assert huge.request.headers["transfer-encoding"] == "chunked" and "content-length" not in huge.request.headers
    assert huge.status_code == 413
    assert huge.json()["detail"] == ("request body (streamed without Content-Length) over the limit; "
                                     "the limit is 1000000 bytes")
    assert small.status_code == 201 and small.request.headers["transfer-encoding"] == "chunked"
    assert [(r.item_id, r.value) for r in feedback_store.ratings()] == [(item, 1.0)]  # the huge one wrote nothing


def _admin_line(server: AppServer) -> str:
    """The admin line that ``serve`` printed (its second line)."""
    return [server.process.stdout.readline() for _ in range(3)][1].strip()


def _admin_answer(server: AppServer, token: str) -> int:
    return httpx.get(f"{server.url}/a/{token}", follow_redirects=False).status_code


def test_admin_token_is_made_once_kept_across_restarts_or_given(store_url, monkeypatch):
    monkeypatch.delenv("LM_GYM_FEEDBACK_ADMIN_TOKEN", raising=False)
    server = AppServer(store_url, None)
    server.start()
    try:
        made = _admin_line(server).removeprefix(f"admin: {server.url}/a/")
        server.stop()
        server.start()  # a restart keeps the token: the link printed first still works, and is not printed again
        assert _admin_line(server).startswith("admin: the link printed when this database's admin token was made")
        assert _admin_answer(server, made) == 303 and _admin_answer(server, made + "x") == 403
        server.stop()
        monkeypatch.setenv("LM_GYM_FEEDBACK_ADMIN_TOKEN", "admin-token-from-the-environment")
        server.start()  # a given token replaces the database's
        assert _admin_line(server) == f"admin: {server.url}/a/admin-token-from-the-environment"
        assert _admin_answer(server, "admin-token-from-the-environment") == 303 and _admin_answer(server, made) == 403
    finally:
        server.stop()
    store = FeedbackStore(store_url)
    assert len(made) >= 30 and store.admin_token_hash() == hash_token("admin-token-from-the-environment")
    store.close()
