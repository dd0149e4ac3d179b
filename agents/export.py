"""Export a trained policy as a plain Hugging Face causal LM directory."""

from __future__ import annotations

import copy
import os
from pathlib import Path


def export_pretrained(policy_or_model, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a plain HF model + tokenizer (LoRA adapters merged) to ``directory``.

    :param policy_or_model: an SB3 algorithm (``LMPPO``/``PPO`` with a Transformer policy), its policy, or a
        causal LM (possibly PEFT-wrapped).
    :param tokenizer: needed only for a bare model.
    :return: the directory; ``AutoModelForCausalLM.from_pretrained`` loads it and the env accepts it as ``model=``.
    """
    policy = getattr(policy_or_model, "policy", policy_or_model)
    actor_critic = getattr(policy, "actor_critic", None)
    model = policy if actor_critic is None else actor_critic.lm
    tokenizer = tokenizer or getattr(actor_critic, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("export_pretrained needs tokenizer= when given a bare model")
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
