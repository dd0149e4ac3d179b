"""Collect human feedback: a rating and comparison web app on SQLite or PostgreSQL, and its exports.

Needs the ``feedback`` extra (``pip install lm-gym[feedback]``). The parts: :mod:`~lm_gym.feedback.store`
(the database), :mod:`~lm_gym.feedback.web` (the FastAPI app), :mod:`~lm_gym.feedback.export` (JSONL and
``datasets`` exports with filters), :mod:`~lm_gym.feedback.quality` (agreement, gold accuracy, arena
scores), :mod:`~lm_gym.feedback.sampling` (pre-generated responses), :mod:`~lm_gym.feedback.live` (a
``FeedbackReward`` that follows the store).
"""
