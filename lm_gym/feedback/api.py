"""The JSON API: the next item, ratings, comparisons and skips for raters; signals for applications; stats for
the admin. Bodies are validated by their pydantic models (unknown fields refused); an ``Idempotency-Key``
header makes a retried request return the stored row (200) instead of writing a second one (201)."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lm_gym.feedback.auth import app_from_key, rater_from_bearer, require_admin, settings_of
from lm_gym.feedback.quality import feedback_stats
from lm_gym.feedback.schema import Item, Rater
from lm_gym.feedback.store import JudgementRequest, StoreError

MAX_COMMENT = 2000
MAX_TEXT = 100_000
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns on PostgreSQL
IdempotencyKey = Header(None, alias="Idempotency-Key", min_length=1, max_length=200,
                        description="a client-chosen key; a retry with the same key is stored once")

router = APIRouter(prefix="/api")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class RatingIn(Strict):
    item_id: int = Field(ge=1, le=MAX_ID, description="the item rated")
    value: Literal[1, -1] = Field(description="+1 good, -1 bad")
    comment: str = Field("", max_length=MAX_COMMENT)
    seconds: float | None = Field(None, ge=0, le=86_400, description="time the rater spent on the item")

    @field_validator("value", mode="before")
    @classmethod
    def _number_not_bool(cls, value):
        if isinstance(value, bool):
            raise ValueError(f"value must be the number 1 or -1, got {str(value).lower()}")
        return value


class ComparisonIn(Strict):
    item_id: int = Field(ge=1, le=MAX_ID, description="the pair compared")
    choice: Literal["a", "b", "tie"] = Field(description="which response is better")
    comment: str = Field("", max_length=MAX_COMMENT)
    seconds: float | None = Field(None, ge=0, le=86_400)


class SkipIn(Strict):
    item_id: int = Field(ge=1, le=MAX_ID)


class SignalIn(Strict):
    prompt: str | list[Message] = Field(description="the prompt as text or chat messages")
    response: str = Field(min_length=1, max_length=MAX_TEXT)
    signal: Literal["like", "dislike", "click"]
    user: str = Field("", max_length=200, description="the application's id for its user (optional)")


class Judgement(BaseModel):
    id: int
    item_id: int
    value: float | None
    created: bool = Field(description="False when the Idempotency-Key had been stored already")


class SignalOut(BaseModel):
    id: int
    item_id: int
    signal: str
    created: bool


class ItemOut(BaseModel):
    id: int
    kind: Literal["single", "pair"]
    prompt: str | list[Message]
    responses: list[str]


CHOICES = {"a": 1.0, "b": -1.0, "tie": 0.0}


@router.get("/items/next", response_model=ItemOut, responses={204: {"description": "nothing left to rate"}})
def next_item(request: Request, rater: Rater = Depends(rater_from_bearer)):
    """The next item for this rater (204 when none is left)."""
    settings = settings_of(request)
    item = settings.store.next_item(rater.id, settings.ratings_per_item)
    if item is None:
        return Response(status_code=204)
    return item_out(item)


@router.post("/ratings", response_model=Judgement, status_code=201)
async def post_rating(body: RatingIn, request: Request, response: Response, rater: Rater = Depends(rater_from_bearer),
                      key: str | None = IdempotencyKey):
    """Rate a single-response item +1 or -1."""
    return await _judge(request, response, JudgementRequest(rater.id, body.item_id, "single", float(body.value),
                                                            body.comment, body.seconds, key))


@router.post("/comparisons", response_model=Judgement, status_code=201)
async def post_comparison(body: ComparisonIn, request: Request, response: Response,
                          rater: Rater = Depends(rater_from_bearer), key: str | None = IdempotencyKey):
    """Compare the two responses of a pair: ``a`` better, ``b`` better or ``tie``."""
    return await _judge(request, response, JudgementRequest(rater.id, body.item_id, "pair", CHOICES[body.choice],
                                                            body.comment, body.seconds, key))


@router.post("/skips", response_model=Judgement, status_code=201)
async def post_skip(body: SkipIn, request: Request, response: Response, rater: Rater = Depends(rater_from_bearer),
                    key: str | None = IdempotencyKey):
    """Skip an item: it is not shown to this rater again and counts as no judgement."""
    return await _judge(request, response, JudgementRequest(rater.id, body.item_id, "skip", None, "", None, key))


async def _judge(request: Request, response: Response, judgement: JudgementRequest) -> Judgement:
    """Store the judgement with the others arriving now (:class:`~lm_gym.feedback.group_commit.GroupCommit`)."""
    try:
        rating, created = await request.app.state.group_commit.record(judgement)
    except StoreError as err:
        raise HTTPException(err.status, str(err)) from err
    response.status_code = 201 if created else 200
    return Judgement(id=rating.id, item_id=rating.item_id, value=rating.value, created=created)


@router.post("/signals", response_model=SignalOut, status_code=201)
def post_signal(body: SignalIn, request: Request, response: Response, app: Rater = Depends(app_from_key),
                key: str | None = IdempotencyKey):
    """Report a user's like, dislike or click on a response of a deployed application."""
    prompt = body.prompt if isinstance(body.prompt, str) else [m.model_dump() for m in body.prompt]
    try:
        signal, created = settings_of(request).store.record_signal(app.id, prompt, body.response, body.signal,
                                                                   body.user, key)
    except StoreError as err:
        raise HTTPException(err.status, str(err)) from err
    response.status_code = 201 if created else 200
    return SignalOut(id=signal.id, item_id=signal.item_id, signal=signal.signal, created=created)


@router.get("/admin/stats", dependencies=[Depends(require_admin)])
def admin_stats(request: Request) -> dict:
    """Ratings per rater and item, agreement, gold accuracy, time per item, and the arena's model scores."""
    return feedback_stats(settings_of(request).store)


def item_out(item: Item) -> ItemOut:
    responses = [item.response_a] if item.response_b is None else [item.response_a, item.response_b]
    return ItemOut(id=item.id, kind=item.kind, prompt=json.loads(item.prompt), responses=responses)
