"""Who is asking: rater tokens, application API keys, the admin token, and signed form tokens.

Every secret is compared in constant time. Form tokens (CSRF) are HMACs of the signed-in identity under
the database's secret, so a form rendered for one rater cannot be posted as another, and a page from
another site cannot post one at all (it never sees the token; the cookies are also ``SameSite=Strict``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from lm_gym.feedback.schema import Rater
from lm_gym.feedback.store import FeedbackStore, hash_token

RATER_COOKIE = "lm_gym_rater"
ADMIN_COOKIE = "lm_gym_admin"

bearer = HTTPBearer(auto_error=False, description="a rater's token (from the invitation link) or the admin token")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an application's API key")


@dataclass
class Settings:
    """What the app is configured with.

    :param store: the feedback store.
    :param admin_token_hash: the SHA-256 of the secret of the admin pages and admin API.
    :param ratings_per_item: judgements wanted per item before it leaves the queue.
    """

    store: FeedbackStore
    admin_token_hash: str
    ratings_per_item: int = 3


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def rater_from_bearer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Rater:
    """The rater whose token is in ``Authorization: Bearer``; 401 when it is missing or unknown. (Async: the
    store remembers tokens, so after a token's first use this needs no database and no worker thread.)"""
    if credentials is None:
        raise HTTPException(401, "missing rater token: send 'Authorization: Bearer <token>' (the token of your "
                                 "invitation link)", headers={"WWW-Authenticate": "Bearer"})
    rater = settings_of(request).store.authenticate(credentials.credentials, "rater")
    if rater is None:
        raise HTTPException(401, "unknown rater token: it matches no invited rater", headers={"WWW-Authenticate": "Bearer"})
    return rater


async def app_from_key(request: Request, key: str | None = Depends(api_key_header)) -> Rater:
    """The application whose API key is in ``X-API-Key``; 401 when it is missing or unknown."""
    if not key:
        raise HTTPException(401, "missing API key: send 'X-API-Key: <key>' (lm-gym feedback invite --app NAME)")
    app = settings_of(request).store.authenticate(key, "app")
    if app is None:
        raise HTTPException(401, "unknown API key: it matches no application")
    return app


async def require_admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Pass when ``Authorization: Bearer`` holds the admin token; 401 otherwise."""
    if credentials is None or not is_admin_token(request, credentials.credentials):
        raise HTTPException(401, "this needs the admin token: send 'Authorization: Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def is_admin_token(request: Request, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(hash_token(token).encode(), settings_of(request).admin_token_hash.encode())


def rater_from_cookie(request: Request) -> Rater | None:
    """The rater signed in on this browser (by their invitation link), or None."""
    return settings_of(request).store.authenticate(request.cookies.get(RATER_COOKIE), "rater")


def form_token(secret: str, identity: str) -> str:
    """The CSRF token of a signed-in identity (``"rater:<id>"`` or ``"admin"``)."""
    return hmac.new(secret.encode(), f"csrf:{identity}".encode(), hashlib.sha256).hexdigest()


def check_form_token(secret: str, identity: str, token: str) -> None:
    """403 unless ``token`` is the CSRF token of ``identity``."""
    if not hmac.compare_digest(form_token(secret, identity).encode(), token.encode()):
        raise HTTPException(403, "the form's csrf token does not belong to this session: reload the page "
                                 "and submit again")


def shown_stamp(secret: str, item_id: int) -> str:
    """A signed record of when an item was shown: ``"<item>.<unix ms>.<hmac>"``, posted back with the form."""
    stamp = f"{item_id}.{int(time.time() * 1000)}"
    return f"{stamp}.{hmac.new(secret.encode(), stamp.encode(), hashlib.sha256).hexdigest()[:32]}"


def seconds_since(secret: str, item_id: int, stamp: str) -> float:
    """Seconds since :func:`shown_stamp` issued ``stamp`` for this item; 400 when it is not one it issued."""
    parts = stamp.split(".")
    if len(parts) == 3 and parts[0] == str(item_id) and parts[1].isdigit():
        expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).hexdigest()[:32]
        if hmac.compare_digest(expected.encode(), parts[2].encode()):
            return max(0.0, time.time() - int(parts[1]) / 1000)
    raise HTTPException(400, f"form field 'shown' is not a stamp this server issued for item {item_id}")
