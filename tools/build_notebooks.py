"""Write the tutorial notebooks (without outputs) from the cell sources below: ``python tools/build_notebooks.py``.

The notebooks are data; this script is their source of truth, so a diff of a notebook is a diff of its text.
"""

import json
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

QUICKSTART = [
    ("markdown", """# lm-gym quickstart

A causal LM as a Gymnasium environment: the actions are tokens, the observations the token ids so far.
This notebook runs on the tiny offline model in about a minute; set `MODEL = "default"` for
SmolLM2-135M-Instruct (slower on a CPU, real text)."""),
    ("code", """import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np

import lm_gym

MODEL = "tiny"  # "default" for SmolLM2-135M-Instruct"""),
    ("markdown", "## Make the env and step it by hand"),
    ("code", """env = gym.make("LanguageModelEnv-v0", model=MODEL, max_new_tokens=8, render_mode="ansi",
               reward=lambda prompts, responses, **context: [float(len(r)) for r in responses])
obs, info = env.reset(seed=0)
print(env.render())
print("observation:", {key: value.shape for key, value in obs.items()}, "actions:", env.action_space)
done = False
while not done:
    action = env.action_space.sample()
    obs, reward, terminated, truncated, info = env.step(action)
    done = terminated or truncated
print(env.render())
print("reward", reward, "log pi_ref of the last token", info["ref_logprob"])"""),
    ("markdown", """## Plug a reward

Any callable `(prompts, responses, **context) -> scores` is a reward; the context carries the response's
token ids. Here: the fraction of response tokens with an id below 200 (a random policy gets about 0.2)."""),
    ("code", """def low_ids(prompts, responses, response_ids, **context):
    return [float(np.mean([token < 200 for token in ids])) for ids in response_ids]"""),
    ("markdown", """## Train with stock stable-baselines3 PPO, the Transformer as the policy

`TransformerActorCriticPolicy`: the LM head gives the action logits, a value head sits on the last hidden
state. `SB3VecEnv` steps all rows in one batched forward."""),
    ("code", """from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

from agents import TransformerActorCriticPolicy
from lm_gym.sb3 import SB3VecEnv

vec_env = VecMonitor(SB3VecEnv(8, model=MODEL, max_new_tokens=6, reward=low_ids))
agent = PPO(TransformerActorCriticPolicy, vec_env, n_steps=12, batch_size=48, n_epochs=4, learning_rate=1e-2,
            gamma=1.0, seed=0, policy_kwargs={"model": MODEL})
curve = []
for _ in range(20):
    agent.learn(8 * 12, reset_num_timesteps=False)
    curve.append((agent.num_timesteps, np.mean([episode["r"] for episode in agent.ep_info_buffer])))
print(f"mean episode reward: first {curve[0][1]:.2f}, last {curve[-1][1]:.2f}")"""),
    ("code", """steps, rewards = zip(*curve)
plt.plot(steps, rewards, marker="o")
plt.xlabel("env steps (tokens)")
plt.ylabel("mean episode reward (last 100 episodes)")
plt.title("PPO with the Transformer policy")
plt.show()"""),
]

HUMAN_FEEDBACK = [
    ("markdown", """# Human feedback: from preferences to a tuned policy

Preference pairs become a feedback reward r_f (similarity to rated responses) and a trained reward model
r_m; their blend r = α·r_f + (1-α)·r_m drives `LMPPO`. On the tiny model this runs in about a minute; the
real HH-RLHF sample is used when it lies beside the project (`shared/data/hh-rlhf/`).

The tiny model is random and writes no language, so its accuracies and rewards here are noise: this
notebook shows the pipeline. Set `MODEL = "default"` (and more pairs and iterations) for real numbers;
`benchmarks/RESULTS.md` has those measured on SmolLM2."""),
    ("code", """from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from agents import LMPPO, evaluate_reward_model, train_reward_model
from lm_gym.data import PreferencePair, chat_prompt, load_preferences, pairs_to_feedback, prompt_text
from lm_gym.data.feedback import FeedbackExample
from lm_gym.rewards import BlendedReward, FeedbackReward
from lm_gym.sb3 import SB3VecEnv

MODEL = "tiny"  # "default" for SmolLM2-135M-Instruct"""),
    ("markdown", "## Load preference data"),
    ("code", """hh = Path("../../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz")
if hh.is_file():
    pairs = list(load_preferences(hh))[:48]
else:  # a stand-in with the same shape
    pairs = [PreferencePair(f"\\n\\nHuman: Question {i}?\\n\\nAssistant:", "I can help with that.", "No.")
             for i in range(48)]
train_pairs, held_out = pairs[:40], pairs[40:]
print(len(train_pairs), "training pairs; first prompt:", repr(train_pairs[0].prompt[:80]))"""),
    ("markdown", """## A feedback reward and a reward model

`FeedbackReward` scores a response by its similarity to the rated responses of similar prompts (chosen +1,
rejected -1). The reward model is a scalar head on the LM, trained with the Bradley-Terry loss."""),
    ("code", """feedback = [FeedbackExample(prompt_text(chat_prompt(e.prompt)), e.response, e.feedback)
            for e in pairs_to_feedback(train_pairs)]
r_f = FeedbackReward(feedback)
rm = train_reward_model(train_pairs, MODEL, epochs=2, lr=1e-3, batch_size=8, max_length=256,
                        eval_pairs=held_out, progress=False)
print(f"held-out pairwise accuracy {rm.evaluation['accuracy']:.2f} (95% CI {rm.evaluation['ci95'][0]:.2f}-"
      f"{rm.evaluation['ci95'][1]:.2f})")
plt.plot([record["loss"] for record in rm.history])
plt.xlabel("step")
plt.ylabel("Bradley-Terry loss")
plt.title("reward model training")
plt.show()"""),
    ("markdown", "## LMPPO on the blended reward"),
    ("code", """prompts = [chat_prompt(pair.prompt) for pair in train_pairs]
reward = BlendedReward(r_f, rm.as_reward(), alpha=0.5)
env = SB3VecEnv(8, model=MODEL, prompts=prompts, reward=reward, max_new_tokens=8, max_prompt_tokens=256,
                truncate_prompt="left")
agent = LMPPO(env=env, n_steps=8, batch_size=64, n_epochs=2, learning_rate=1e-3, seed=0,
              policy_kwargs={"model": MODEL})


def held_out_rewards(agent, count=16):
    eval_env = SB3VecEnv(count, model=MODEL, reward=reward, max_new_tokens=8, max_prompt_tokens=256,
                         truncate_prompt="left", prompts=[chat_prompt(p.prompt) for p in held_out])
    obs, done, rewards, texts = eval_env.reset(), np.zeros(count, bool), np.zeros(count), [""] * count
    while not done.all():
        actions, _ = agent.predict(obs)
        obs, step_rewards, dones, infos = eval_env.step(actions)
        for row in np.flatnonzero(dones & ~done):
            rewards[row], texts[row], done[row] = step_rewards[row], infos[row]["response_text"], True
    return rewards, texts


before, before_texts = held_out_rewards(agent)
agent.learn(8 * 8 * 10)
after, after_texts = held_out_rewards(agent)
print(f"held-out reward: before {before.mean():.3f}, after {after.mean():.3f}")"""),
    ("code", """plt.bar(["before", "after"], [before.mean(), after.mean()],
        yerr=[before.std() / np.sqrt(len(before)), after.std() / np.sqrt(len(after))])
plt.ylabel("mean held-out reward")
plt.show()
for old, new in list(zip(before_texts, after_texts))[:3]:
    print(f"before: {old!r}\\nafter:  {new!r}\\n")"""),
]

TOOLS = [
    ("markdown", """# Multi-turn episodes with tools

The agent writes a turn token by token; when its turn holds a tool call, the env runs the tool and inserts
the result's ids after the agent's, then the agent's next turn starts. The agent's sampled ids are never
decoded and re-encoded, and `obs["agent_mask"]` marks which ids the agent chose: those are the actions
every agent in `agents/` trains on; the inserted ids are context.

This notebook runs on the tiny offline model in about a minute; its policy is random, so it shows the
mechanics. Set `MODEL = "default"` for SmolLM2-135M-Instruct; `benchmarks/RESULTS.md` has its numbers on
the calculator task."""),
    ("code", """import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np

import lm_gym
from agents import GRPO
from lm_gym.sb3 import SB3VecEnv
from lm_gym.tasks import evaluate_tool_task, make_task

MODEL = "tiny"  # "default" for SmolLM2-135M-Instruct"""),
    ("markdown", """## A tool in five lines

A tool is a plain function with type hints and a docstring; its JSON schema goes into the prompt. Here we
write the agent's turn by hand: its call's closing tag ends the turn, and the env answers with the result."""),
    ("code", """def word_length(word: str) -> int:
    \"\"\"Count the letters of a word.

    Args:
        word: the word to measure
    \"\"\"
    return len(word)


env = gym.make("LanguageModelEnv-v0", model=MODEL, tools=[word_length], max_new_tokens=64, max_prompt_tokens=512,
               multi_turn={"max_turns": 2, "context_tokens": 800}, reward=lambda prompts, responses: [0.0])
tokenizer = env.unwrapped.tokenizer
obs, _ = env.reset(seed=0, options={"prompt": "How long is the word 'gymnasium'?"})
turn = '<tool_call>{"name": "word_length", "arguments": {"word": "gymnasium"}}</tool_call>'
for token in tokenizer(turn, add_special_tokens=False).input_ids:
    obs, reward, terminated, truncated, info = env.step(token)
for entry in info["turns"]:
    print(entry)
inserted = (obs["attention_mask"] == 1) & (obs["agent_mask"] == 0)
print("the env inserted:", repr(tokenizer.decode(obs["input_ids"][inserted][-20:])))
print("agent ids in the context:", int(obs["agent_mask"].sum()))"""),
    ("markdown", """## The calculator task, trained with GRPO

`task="calculator"` gives 3-digit multiplications, a `calculator` tool, and a checker of the final answer.
GRPO samples a group of episodes per problem and pushes the policy towards the better ones of each group."""),
    ("code", """task = make_task("calculator")
env = SB3VecEnv(4, group_size=2, model=MODEL, task="calculator", max_new_tokens=8, max_prompt_tokens=512,
                multi_turn={"max_turns": 2, "context_tokens": 800})
agent = GRPO(env=env, n_steps=16, batch_size=256, n_epochs=1, learning_rate=1e-3, seed=0,
             policy_kwargs={"model": MODEL})
rewards = []
for iteration in range(3):
    agent.learn(16 * 4, reset_num_timesteps=False)
    rewards.append(agent.logger.name_to_value.get("rollout/reward_mean", float("nan")))
plt.plot(rewards, marker="o")
plt.xlabel("iteration")
plt.ylabel("mean episode reward")
plt.show()"""),
    ("markdown", """## Held-out accuracy and one episode's turns

`evaluate_tool_task` plays each held-out problem as one greedy episode with the task's tools and reports
accuracy, how often a tool was called, and how many calls were valid, each with a 95% interval."""),
    ("code", """policy_lm = agent.actor_critic.lm  # the trained LM (the env's own LM is the reference)
result = evaluate_tool_task(policy_lm, env.tokenizer, task, problems=4, max_new_tokens=8, max_turns=2)
print("accuracy", result["accuracy"])
print("called a tool", result["called"])
for entry in result["episodes"][0]["turns"]:
    print(f"[{entry['role']}] {entry['text'][:100]!r}")"""),
]


def write(name: str, cells: list) -> None:
    """Write one notebook (nbformat 4, no outputs)."""
    notebook = {
        "cells": [
            {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True),
             **({"execution_count": None, "outputs": []} if kind == "code" else {})}
            for kind, source in cells
        ],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 4,
    }
    (NOTEBOOKS / name).write_text(json.dumps(notebook, indent=1) + "\n")


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_human_feedback.ipynb", HUMAN_FEEDBACK)
    write("03_tools.ipynb", TOOLS)
