"""One precision setting for a whole run: ``"auto"`` (default), ``"bf16"`` or ``"fp32"``.

What each precision means, tensor by tensor:

- LMs that only run (the env's LM, the reference, a frozen LoRA base) hold their weights in the precision's
  dtype and compute in it.
- LMs that train keep float32 master weights and float32 optimizer states; their forwards run under
  ``torch.autocast`` in the precision's dtype (matrix multiplies and attention in bf16, norms and
  everything else as autocast decides).
- Logits are cast to float32 before any softmax: log-softmax, log-probs, entropy, KL, rewards, advantages,
  value heads, value targets and losses are float32 in every precision.

``"auto"`` picks bf16 where the hardware runs it fast and float32 elsewhere: on CUDA, bf16 when the device
supports it; on a CPU, bf16 when the CPU has bf16 instructions (AMX or AVX-512 BF16) and a bf16 matrix
multiply measured on it beats float32 by :data:`CPU_SPEEDUP_NEEDED` (measured once per CPU and torch
version, then cached). Each precision chosen and its reason are printed once per process (on stderr).

``LM_GYM_PRECISION`` sets the precision of everything not given one explicitly (for example ``fp32`` for
a whole test run); unset, that is ``"auto"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
CPU_SPEEDUP_NEEDED = 1.5  # a bf16 matmul must be this much faster than float32 for "auto" to pick bf16
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: its ``name`` (``"bf16"`` or ``"fp32"``) and why it was chosen."""

    name: str
    reason: str = "set explicitly"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of weights that only run, and of autocast regions."""
        return DTYPES[self.name]

    @property
    def reduced(self) -> bool:
        """True for bf16 (the forwards of float32 weights run under autocast)."""
        return self.name != "fp32"

    def autocast(self, device: torch.device | str):
        """A context in which forwards of float32 weights compute in :attr:`dtype` (a no-op for fp32).

        Nested inside one open context, autocast keeps each weight's cast: the first decode step casts
        the weights, the later steps reuse them until the outermost context closes.
        """
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def autocast_off(device: torch.device | str):
    """A context in which autocast is off (float32 stays float32), inside or outside an autocast region."""
    return torch.autocast(torch.device(device).type, enabled=False)


def resolve_precision(precision: "str | torch.dtype | Precision | None" = None, device=None) -> Precision:
    """The :class:`Precision` that ``precision`` names on ``device``.

    :param precision: ``"auto"``, ``"bf16"``, ``"fp32"`` (also their torch dtypes and dtype names,
        e.g. ``torch.bfloat16`` or ``"bfloat16"``), a :class:`Precision`, or ``None`` (``$LM_GYM_PRECISION``,
        else ``"auto"``).
    :param device: where the models run (default: CUDA when available); decides what ``"auto"`` picks.
    """
    if isinstance(precision, Precision):
        return precision
    if precision is None:
        precision = os.environ.get("LM_GYM_PRECISION", "auto")
    name = precision_name(precision)
    device = torch.device(device) if device is not None else _default_device()
    chosen = _auto(device) if name == "auto" else Precision(name)
    _announce(chosen)
    return chosen


def precision_name(precision: "str | torch.dtype") -> str:
    """The canonical name (``"auto"``, ``"bf16"``, ``"fp32"``) of a precision or dtype; others raise.

    float16 is not offered: training in it needs loss scaling, which bf16 (same speed where fp16 is fast) does
    not.
    """
    if isinstance(precision, torch.dtype):
        names = {dtype: name for name, dtype in DTYPES.items()}
        if precision not in names:
            raise ValueError(f"precision {precision} is not supported; expected one of {sorted(DTYPES)}")
        return names[precision]
    text = str(precision).lower().removeprefix("torch.")
    name = ALIASES.get(text, text)
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"precision {precision!r} is not one of 'auto', 'bf16', 'fp32'")
    return name


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _auto(device: torch.device) -> Precision:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto: no bf16 rule for {device.type} devices")
    return _auto_cpu()


@lru_cache(maxsize=1)
def _auto_cpu() -> Precision:
    cpu, flags = cpu_model(), cpu_bf16_flags()
    if not flags:
        return Precision("fp32", f"auto: {cpu} has no bf16 instructions (no AMX or AVX-512 BF16)")
    speedup = cpu_bf16_speedup()
    where = f"{cpu} has {', '.join(flags)}; a bf16 matmul ran {speedup:.1f}x float32's speed"
    if speedup >= CPU_SPEEDUP_NEEDED:
        return Precision("bf16", f"auto: {where}")
    return Precision("fp32", f"auto: {where} (< {CPU_SPEEDUP_NEEDED}x)")


_announced: set[Precision] = set()


def _announce(precision: Precision) -> None:
    if precision not in _announced:
        _announced.add(precision)
        print(f"lm-gym precision: {precision}", file=sys.stderr)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction sets among :data:`BF16_CPU_FLAGS` (Linux ``/proc/cpuinfo`` flags)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.split(":")[0].strip() == name),
                        None)
    except OSError:
        return None


def cpu_bf16_speedup(size: int = 1024, repeats: int = 4) -> float:
    """bf16 over float32 speed of a ``size``³ matrix multiply on this CPU, at this process's thread count.

    Measured once (about 0.1 s) and cached in lm-gym's cache directory by CPU model, torch version and
    threads.
    """
    from lm_gym.models import cache_dir

    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {size}"
    path = cache_dir() / "cpu_bf16_speedup.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _matmul_seconds(torch.float32, size, repeats) / _matmul_seconds(torch.bfloat16, size, repeats)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
    return known[key]


def _matmul_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - started) / repeats
