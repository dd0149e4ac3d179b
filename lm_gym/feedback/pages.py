"""The HTML pages: the rating page for invited raters and the admin page.

An invitation link ``/r/<token>`` (or ``/a/<admin token>``) sets an HttpOnly, ``SameSite=Strict`` cookie
and redirects to the page, so the secret leaves the address bar. Every form carries the session's CSRF
token. Templates autoescape everything: prompts, responses and comments are text, never HTML.
"""

from __future__ import annotations

import json
from importlib import resources

import jinja2
from fastapi import APIRouter, Form, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from lm_gym.data.feedback import chat_prompt
from lm_gym.feedback.api import CHOICES, MAX_COMMENT, MAX_ID
from lm_gym.feedback.auth import (
    ADMIN_COOKIE, RATER_COOKIE, check_form_token, form_token, is_admin_token, rater_from_cookie, seconds_since,
    settings_of, shown_stamp,
)
from lm_gym.feedback.quality import feedback_stats
from lm_gym.feedback.store import StoreError

templates = jinja2.Environment(
    loader=jinja2.PackageLoader("lm_gym.feedback", "templates"),
    autoescape=jinja2.select_autoescape(["html"], default=True),
    undefined=jinja2.StrictUndefined,
)
templates.filters["fmt"] = lambda value: "–" if value is None else f"{value:.2f}"
router = APIRouter(include_in_schema=False)
SINGLE_CHOICES = {"good": 1.0, "bad": -1.0}


def render(name: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status)


def turns(prompt_json: str) -> list[dict]:
    """The prompt as chat turns: message lists as they are, HH-RLHF transcripts split, plain text one turn."""
    prompt = chat_prompt(json.loads(prompt_json))
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _signed_in(response: RedirectResponse, cookie: str, token: str) -> RedirectResponse:
    response.set_cookie(cookie, token, httponly=True, samesite="strict", max_age=90 * 86400)
    return response


@router.get("/r/{token}")
def accept_invitation(token: str, request: Request):
    if settings_of(request).store.authenticate(token, "rater") is None:
        return render("error.html", 403, message="This invitation link is not valid. Ask the admin for a new one.")
    return _signed_in(RedirectResponse("/rate", status_code=303), RATER_COOKIE, token)


@router.get("/rate")
def rate_page(request: Request):
    rater = rater_from_cookie(request)
    if rater is None:
        return render("error.html", 403, message="Open your personal invitation link to rate.")
    settings = settings_of(request)
    done, left = settings.store.progress(rater.id, settings.ratings_per_item)
    item = settings.store.next_item(rater.id, settings.ratings_per_item)
    context = dict(rater=rater, done=done, left=left, item=item, max_comment=MAX_COMMENT)
    if item is not None:
        secret = settings.store.secret
        context.update(turns=turns(item.prompt), csrf=form_token(secret, f"rater:{rater.id}"),
                       shown=shown_stamp(secret, item.id))
    return render("rate.html", **context)


@router.post("/rate/{item_id}")
def rate_submit(request: Request, item_id: int = Path(ge=1, le=MAX_ID), choice: str = Form(...), csrf: str = Form(...),
                shown: str = Form(...), comment: str = Form("", max_length=MAX_COMMENT)):
    rater = rater_from_cookie(request)
    if rater is None:
        raise HTTPException(401, "not signed in: open your personal invitation link first")
    store = settings_of(request).store
    check_form_token(store.secret, f"rater:{rater.id}", csrf)
    seconds = seconds_since(store.secret, item_id, shown)
    kind, value = _choice(choice)
    try:
        store.record(rater.id, item_id, kind, value, comment if kind != "skip" else "", seconds)
    except StoreError as err:
        return render("error.html", err.status, message=str(err))
    return RedirectResponse("/rate", status_code=303)


def _choice(choice: str) -> tuple[str, float | None]:
    if choice in SINGLE_CHOICES:
        return "single", SINGLE_CHOICES[choice]
    if choice in CHOICES:
        return "pair", CHOICES[choice]
    if choice == "skip":
        return "skip", None
    raise HTTPException(400, f"form field 'choice' = {choice[:40]!r}; expected good, bad, a, b, tie or skip")


@router.get("/a/{token}")
def admin_sign_in(token: str, request: Request):
    if not is_admin_token(request, token):
        return render("error.html", 403, message="This admin link is not valid.")
    return _signed_in(RedirectResponse("/admin", status_code=303), ADMIN_COOKIE, token)


def _require_admin_cookie(request: Request) -> None:
    if not is_admin_token(request, request.cookies.get(ADMIN_COOKIE)):
        raise HTTPException(403, "the admin page needs the admin link printed by 'lm-gym feedback serve'")


@router.get("/admin")
def admin_page(request: Request):
    _require_admin_cookie(request)
    store = settings_of(request).store
    return render("admin.html", stats=feedback_stats(store), csrf=form_token(store.secret, "admin"), invited=None)


@router.post("/admin/invite")
def admin_invite(request: Request, name: str = Form(..., min_length=1, max_length=200), csrf: str = Form(...)):
    _require_admin_cookie(request)
    store = settings_of(request).store
    check_form_token(store.secret, "admin", csrf)
    _, token = store.invite(name)
    link = str(request.url_for("accept_invitation", token=token))
    return render("admin.html", stats=feedback_stats(store), csrf=form_token(store.secret, "admin"),
                  invited={"name": name, "link": link})


def static_file(name: str) -> str:
    return resources.files("lm_gym.feedback").joinpath("static", name).read_text()
