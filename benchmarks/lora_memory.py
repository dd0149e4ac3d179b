"""Resident memory of an LMPPO run on the default model: full fine-tuning vs LoRA, with and without sharing
the base weights between the env's LM (the reference) and the policy.

Each setting runs in a fresh process (so peak RSS is its own): build the env and the agent, run one
rollout and its update, then report the peak resident set size and the bytes of distinct weight storage
held by env and policy. Run from the project root: ``python -m benchmarks.lora_memory``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SETTINGS = {
    "full fine-tuning (env LM + policy copy)": {"lora": False, "share": False},
    "LoRA, policy on its own copy": {"lora": True, "share": False},
    "LoRA, policy shares the env's LM": {"lora": True, "share": True},
}
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def measure(lora: bool, share: bool, envs: int, tokens: int) -> dict:
    """Peak RSS (MiB) and distinct weight storage (MiB) after one LMPPO iteration in this process."""
    from agents import LMPPO
    from lm_gym.sb3 import SB3VecEnv

    env = SB3VecEnv(envs, max_new_tokens=tokens, max_prompt_tokens=64, truncate_prompt="left",
                    reward=lambda p, r, **c: [float(len(x)) for x in r], device="cpu")
    policy_kwargs = {"model": env.model if share else "default", "device": "cpu"}
    if share:
        policy_kwargs["tokenizer"] = env.tokenizer
    if lora:
        policy_kwargs["lora"] = LORA
    agent = LMPPO(env=env, n_steps=tokens, batch_size=envs * tokens, n_epochs=1, seed=0, device="cpu",
                  policy_kwargs=policy_kwargs)
    agent.learn(envs * tokens)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for module in (env.model, agent.policy) for p in module.parameters()}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_mib": sum(storages.values()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one setting and print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**SETTINGS[args.child], envs=args.envs, tokens=args.response_tokens)))
        return
    from benchmarks.machine import describe_machine

    print(f"machine: {describe_machine()}")
    print(f"default model, {args.envs} envs x {args.response_tokens} tokens, one rollout + update, LoRA r=16")
    print(f"{'setting':44s} {'peak RSS MiB':>13s} {'weights MiB':>12s}")
    for name in SETTINGS:
        output = subprocess.run([sys.executable, "-m", "benchmarks.lora_memory", "--child", name, "--envs",
                                 str(args.envs), "--response-tokens", str(args.response_tokens)],
                                capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(f"{name:44s} {result['peak_rss_mib']:13.0f} {result['weights_mib']:12.0f}")


if __name__ == "__main__":
    main()
