"""``make_vec(..., vectorization_mode="async")`` forks workers after the parent ran torch ops: it must not hang.

GNU OpenMP (torch's CPU thread pool) does not survive ``fork``; ``import lm_gym`` registers an at-fork hook that
gives forked children one torch thread. The scenario runs in a fresh interpreter (its own session, killed
whole on timeout) so that a hang fails the test instead of blocking it.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    import numpy as np
    import torch
    import gymnasium as gym
    import lm_gym

    torch.set_num_threads(2)
    torch.ones(512, 512) @ torch.ones(512, 512)  # the parent's OpenMP pool now exists
    envs = gym.make_vec("LanguageModelEnv-v0", num_envs=2, vectorization_mode="async",
                        vector_kwargs={"context": "fork"}, model="tiny", max_new_tokens=4)
    obs, info = envs.reset(seed=0)  # hung here: the workers' first forward waited for the parent's threads
    for _ in range(4):
        obs, reward, terminated, truncated, info = envs.step(np.array([5, 6]))
    assert truncated.all() and (obs["input_ids"][:, -4:] == [[5] * 4, [6] * 4]).all()  # at 4 new tokens
    envs.close()

    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, str(torch.get_num_threads()).encode())
        os._exit(0)
    os.wait()
    child = int(os.read(read, 16))
    torch.ones(512, 512) @ torch.ones(512, 512)
    print("threads", torch.get_num_threads(), child)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_async_vector_env_after_parent_torch_ops_does_not_hang():
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the parent and its hung workers
        process.communicate()
        pytest.fail("reset/step of 2 async envs hung after a torch op in the parent")
    assert process.returncode == 0, err[-3000:]
    assert "threads 2 1" in out  # the parent keeps its 2 threads; a forked child gets 1
