"""TorchRL's own ``GymEnv(env_id, num_envs=N)`` on the registered env (not lm_gym's adapter).

TorchRL builds an ``AsyncVectorEnv`` of ``gymnasium.make`` single envs and learns one info key set from a dummy
reset and step; every key a reset info has must then be in every step's info, and text cannot be held. So reset
infos are empty and the step infos' numeric ``ref_logprob`` is what TorchRL reads.
"""

import subprocess
import sys
import textwrap

from tests.conftest import stop_id

# TorchRL sets the "spawn" start method on import: the workers re-import this script (as __mp_main__), which
# registers the env there too; hence a script file, run in a fresh interpreter with a timeout.
SCRIPT = textwrap.dedent("""
    import torch
    import lm_gym  # registers LanguageModelEnv-v0, also in the spawned workers
    from torchrl.envs import GymEnv

    if __name__ == "__main__":
        env = GymEnv("LanguageModelEnv-v0", num_envs=2, model="tiny", max_new_tokens=4)
        env.set_seed(0)
        torch.manual_seed(0)
        rollout = env.rollout(20, break_when_any_done=False)  # KeyError: 'prompt_text' at the first end before
        after = rollout["next"]
        assert rollout.batch_size == (2, 20), rollout.batch_size
        assert set(after.keys()) == {"input_ids", "attention_mask", "ref_logprob", "reward", "done",
                                     "terminated", "truncated"}, sorted(after.keys())
        done = after["done"].squeeze(-1)
        reward = after["reward"].squeeze(-1)
        assert torch.equal(done, (after["terminated"] | after["truncated"]).squeeze(-1))
        assert done.sum(-1).min() >= 20 // 4, done.int().tolist()  # truncated every 4 tokens (or sooner)
        assert (reward[~done] == 0).all() and (reward[done] != 0).all(), reward.tolist()
        assert (after["ref_logprob"][~done] < 0).all()
        env.close()
        print("ok", done.int().tolist())
""")


def test_reset_info_keys_are_in_every_step_info(make_tiny_env):
    env = make_tiny_env(max_new_tokens=3)
    _, reset_info = env.reset(seed=0)
    assert reset_info == {}
    for action in (5, 6):
        *_, info = env.step(action)
        assert set(info) == {"ref_logprob"}
    *_, truncated, info = env.step(7)
    assert truncated and {"ref_logprob", "turn_ended", "prompt_text", "response_text", "reward_components"} == set(info)
    assert env.reset(seed=1)[1] == {} and env.step(stop_id(env))[2]


def test_torchrl_gymenv_with_num_envs_rolls_out_past_episode_ends(tmp_path):
    script = tmp_path / "torchrl_gymenv.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
