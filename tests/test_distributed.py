"""Data-parallel LMPPO on torch.distributed: 2 CPU processes (gloo) against one process."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ddp_worker

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--model=tiny", "--num-envs=4", "--max-new-tokens=4", "--max-prompt-tokens=48", "--eval-prompts=4",
              "--eval-samples=1", "--learning-rate=1e-3", "--batch-size=16"]


def torchrun(nproc: int, *args: str, timeout: int = 600) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(2, "tests/ddp_worker.py", str(out), "4")  # 2 ranks of 2 env rows
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def test_ranks_start_equal_train_and_stay_identical(two_ranks):
    first, second = two_ranks
    assert torch.equal(first["start"], second["start"])
    assert torch.equal(first["end"], second["end"])  # averaged gradients: the same update on every rank
    assert not torch.equal(first["start"], first["end"]) and first["lm_changed"]
    assert first["reward_count"] == second["reward_count"]  # reward normalisation saw every rank's episodes


def test_two_ranks_take_as_many_samples_per_update_as_one_rank_with_twice_the_envs(two_ranks, tmp_path):
    ddp_worker.main(tmp_path, 4)  # one process with all 4 rows
    single = torch.load(tmp_path / "rank0.pt")
    assert single["timesteps"] == two_ranks[0]["timesteps"] == two_ranks[1]["timesteps"] == [16, 32, 48]


def test_ranks_skip_an_update_together_when_one_rank_has_no_signal(tmp_path):
    torchrun(2, "tests/ddp_skip_worker.py", str(tmp_path), timeout=240)  # a rank waiting on the other hangs
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for record in (first, second):
        assert torch.equal(record["start"], record["end"]) and record["updates"] == 0
        assert record["trained_rollouts"] == 2
    with open(tmp_path / "log0" / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row["train/skipped_update"]]  # SB3 dumps an update's stats with the next rollout
    assert logged and all(float(row["train/skipped_update"]) == 1.0 for row in logged)
    assert all(float(row["train/groups_uniform"]) == 1.0 for row in logged)  # rank 0's group, counted once


def test_cli_nproc_trains_on_rank_zero_files_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "agents.cli", "train", "--nproc", "2", "--iterations=1", f"--run-dir={run_dir}",
                    *TINY_FLAGS], cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert (run_dir / "checkpoint.zip").is_file() and (run_dir / "model" / "config.json").is_file()
    result = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--nproc=2", "--iterations=2",
                             f"--resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [0, 1]
    assert [int(row["timesteps"]) for row in rows] == [16, 32]  # 4 steps of all 4 rows, counted over both ranks


def test_num_envs_must_split_over_the_ranks(tmp_path):
    result = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--nproc=2", "--num-envs=3",
                             f"--run-dir={tmp_path}", *TINY_FLAGS[:1]], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and "num_envs=3 does not split evenly over 2 ranks" in result.stderr
