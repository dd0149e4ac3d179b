"""Data that episodes and rewards read: prompt sets (and, later, feedback and preferences)."""

from lm_gym.data.prompts import Prompt, PromptSampler, default_prompts, load_prompts, prompt_text, read_prompt_file

__all__ = ["Prompt", "PromptSampler", "default_prompts", "load_prompts", "prompt_text", "read_prompt_file"]
