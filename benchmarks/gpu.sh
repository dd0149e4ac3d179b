#!/usr/bin/env bash
# The GPU checks of issue 13, for a lent device machine (one prepared run, under 8 minutes):
# env throughput (N up to 512, bf16 and fp32, against model.generate), one LMPPO iteration per precision with
# the precision checks, then the precision and log-prob tests with bf16 as every test's default.
# Needs a Python with a CUDA torch and this project installed (pip install -e .); the default model in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
timeout 360 python -m benchmarks.gpu_throughput --sizes 32 128 512
LM_GYM_PRECISION=bf16 timeout 100 python -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_logprobs.py
