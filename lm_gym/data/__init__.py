"""Data that episodes and rewards read: prompt sets, rated responses and preference pairs."""

from lm_gym.data.feedback import (
    FeedbackExample,
    PreferencePair,
    chat_prompt,
    default_feedback,
    load_feedback,
    load_preferences,
    pairs_to_feedback,
    transcript_to_messages,
)
from lm_gym.data.prompts import Prompt, PromptSampler, default_prompts, load_prompts, prompt_text, read_prompt_file
from lm_gym.data.records import DataError, DataReport, DataWarning, Records

__all__ = [
    "DataError", "DataReport", "DataWarning", "FeedbackExample", "PreferencePair", "Prompt", "PromptSampler",
    "Records", "chat_prompt", "default_feedback", "default_prompts", "load_feedback", "load_preferences", "load_prompts",
    "pairs_to_feedback", "prompt_text", "read_prompt_file", "transcript_to_messages",
]
