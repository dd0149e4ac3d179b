"""The machine a benchmark ran on, and the bounds measured on it."""

import os
import time

import torch

from lm_gym.precision import cpu_bf16_flags, cpu_model


def describe_machine() -> str:
    """CPU model and its bf16 instructions, core count, torch version and threads, and the GPU if any."""
    flags = ", ".join(cpu_bf16_flags()) or "no bf16 instructions"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_model()} ({flags}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}")


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """GFLOP/s of a ``size``³ matrix multiply in ``dtype``: the compute bound of this run."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
