"""A real headless Chromium (Debian's package, driven by Playwright) rates through the served app.

It opens an invitation link, rates by click and by keyboard, compares a pair, and the test reads the rows
back from the database; model text with ``<script>`` and ``<img onerror>`` shows as text and never runs.
Set ``FEEDBACK_SCREENSHOT=path.png`` to keep the rating page's screenshot (the README's comes from here).
"""

import os
import shutil

import pytest
from playwright.sync_api import sync_playwright

from lm_gym.feedback.store import FeedbackStore, NewItem
from tests.feedback_servers import AppServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
ADMIN = "browser-test-admin-token-0123"


@pytest.fixture
def served(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    dialogue = [{"role": "user", "content": "Can you suggest a name for my cat?"},
                {"role": "assistant", "content": "Sure! Is it a kitten or a grown cat?"},
                {"role": "user", "content": "A grown cat, very calm."}]
    ids = store.add_items([
        NewItem(dialogue, "How about Miso? It suits a calm cat, short and warm."),
        NewItem(f"Repeat this: {EVIL}", EVIL),
        NewItem("Explain rain to a child.", "Clouds hold tiny drops; when they get heavy they fall as rain.",
                "Rain is precipitation.", model_a="tuned", model_b="reference"),
    ])
    rater, token = store.invite("ann")
    server = AppServer(url, ADMIN, ratings_per_item=1)
    server.start()
    yield server, store, ids, rater, token
    server.stop()
    store.close()


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does this)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        browser.close()


def test_rate_by_click_and_keyboard_and_compare(served, page, tmp_path):
    server, store, ids, rater, token = served
    page.goto(f"{server.url}/r/{token}")
    assert page.url == f"{server.url}/rate"
    assert page.locator(".turn").count() == 3 and "0 done · 3 left" in page.inner_text("#progress")
    shot = page.screenshot(path=os.environ.get("FEEDBACK_SCREENSHOT") or tmp_path / "rating.png", full_page=True)
    assert shot.startswith(b"\x89PNG")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # reads on a phone: no sideways scroll
    page.fill("#comment", "friendly")
    page.click("button[value=good]")

    page.wait_for_selector("text=1 done · 2 left")
    assert page.inner_text("#response-a p") == EVIL  # shown as text, exactly
    assert page.evaluate("window.pwned") is None and page.locator("img").count() == 0
    page.keyboard.press("2")  # Bad

    page.wait_for_selector("text=2 done · 1 left")
    assert page.locator(".response").count() == 2 and "tuned" not in page.content()
    page.keyboard.press("c")
    page.keyboard.type("1 is clearer")  # typed into the comment: no shortcut fires
    assert page.input_value("#comment") == "1 is clearer"
    page.locator("#comment").blur()
    page.keyboard.press("1")  # A is better
    page.wait_for_selector("#finished")

    rows = [(r.item_id, r.value, r.comment) for r in store.ratings()]
    assert rows == [(ids[0], 1.0, "friendly"), (ids[1], -1.0, ""), (ids[2], 1.0, "1 is clearer")]
    assert all(r.rater_id == rater and r.seconds is not None for r in store.ratings())
    assert page.errors == []


def test_without_an_invitation_nothing_is_shown(served, page):
    server, store, _, _, _ = served
    page.goto(f"{server.url}/rate")
    assert "invitation link" in page.inner_text("#message") and page.locator("form").count() == 0
    page.goto(f"{server.url}/r/forged-token")
    assert "not valid" in page.inner_text("#message")
    assert store.ratings() == []


def test_admin_link_printed_by_serve_invites_a_rater(served, page):
    server, store, _, _, _ = served
    printed = [server.process.stdout.readline() for _ in range(3)]
    assert printed[0].startswith(f"lm-gym feedback on {server.url} (database sqlite:///")
    admin_link = printed[1].split("admin: ", 1)[1].strip()
    assert admin_link == f"{server.url}/a/{ADMIN}"
    page.goto(admin_link)
    page.fill("input[name=name]", "bea")
    page.click("form.inline button")
    link = page.inner_text("#invite-link")
    page.goto(link)
    assert "bea" in page.inner_text("header") and "0 done · 3 left" in page.inner_text("#progress")
    assert store.authenticate(link.rsplit("/", 1)[1], "rater").name == "bea"
