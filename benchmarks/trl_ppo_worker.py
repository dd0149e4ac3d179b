"""TRL's side of ``benchmarks.trl_ppo``: PPO iterations of ``trl.experimental.ppo.PPOTrainer`` (``trl==1.12.0``).

Runs inside TRL's own virtual environment and imports nothing from lm_gym. It reads one JSON job from
stdin (``model_dir``, ``reward_dir``, ``prompts`` as token ids, ``response_tokens``, ``epochs``,
``minibatches``, ``iterations``, ``learning_rate``, ``temperature``, ``seed``, ``bf16``), trains that many PPO iterations
(one rollout batch of all prompts and its epochs each) and prints one JSON line: the package versions and,
per iteration, the seconds of the whole iteration, of its rollout and update phases, of sampling, of the
reward model and of the optimizer steps, with token counts. TRL's own log lines go to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo

PACKAGES = ("trl", "torch", "transformers", "accelerate", "datasets")


class PhaseClock(TrainerCallback):
    """Seconds and counts per PPO iteration of ``PPOTrainer.train()``.

    A trainer callback closes each iteration at ``on_step_end``; wrappers of the trainer module's functions
    time sampling and the reward model and mark where the update starts (the first forward with gradients).
    """

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.reward_model = None
        self.iterations: list[dict] = []
        self._start()

    def _start(self) -> None:
        self.started = time.perf_counter()
        self.record = {"generation_s": 0.0, "reward_model_s": 0.0, "optimizer_s": 0.0, "optimizer_steps": 0,
                       "rollout_s": None, "generated_positions": 0, "response_tokens": 0, "eos_rows": 0}

    def on_train_begin(self, args, state, control, **kwargs):
        """The first iteration starts here."""
        self._start()

    def on_step_end(self, args, state, control, **kwargs):
        """One rollout and its epochs are done: store the iteration and start the next one."""
        total = time.perf_counter() - self.started
        self.iterations.append({**self.record, "iteration_s": total, "update_s": total - self.record["rollout_s"]})
        self._start()

    def sampling(self, batch_generation):
        """Wrap TRL's ``batch_generation``: time it and count the sampled tokens."""
        def timed(model, queries, *args, **kwargs):
            started = time.perf_counter()
            query_responses, logits = batch_generation(model, queries, *args, **kwargs)
            self.record["generation_s"] += time.perf_counter() - started
            self._count(query_responses[:, queries.shape[1]:])
            return query_responses, logits
        return timed

    def _count(self, responses: torch.Tensor) -> None:
        """Positions generated, tokens up to and including the first EOS, rows that reached EOS."""
        is_eos = responses == self.eos_token_id
        width = responses.shape[1]
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, width)
        self.record["generated_positions"] += responses.numel()
        self.record["response_tokens"] += int(first.sum())
        self.record["eos_rows"] += int(is_eos.any(dim=1).sum())

    def scoring(self, get_reward):
        """Wrap TRL's ``get_reward`` (reward and value model): time the reward model's calls."""
        def timed(model, *args, **kwargs):
            started = time.perf_counter()
            result = get_reward(model, *args, **kwargs)
            if model is self.reward_model:
                self.record["reward_model_s"] += time.perf_counter() - started
            return result
        return timed

    def update_start(self, forward):
        """Wrap TRL's ``forward``: the first call with gradients ends the rollout phase."""
        def marked(*args, **kwargs):
            if torch.is_grad_enabled() and self.record["rollout_s"] is None:
                self.record["rollout_s"] = time.perf_counter() - self.started
            return forward(*args, **kwargs)
        return marked

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Time every step of ``optimizer``."""
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "step_started", time.perf_counter()))
        optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, *_) -> None:
        self.record["optimizer_s"] += time.perf_counter() - self.step_started
        self.record["optimizer_steps"] += 1


def load_tokenizer(model_dir: str):
    """The tokenizer, left-padded, with a pad token other than EOS.

    TRL finds padding as ``ids == pad_token_id``: a pad equal to EOS would hide the EOS tokens of the
    chat-formatted prompts from attention and cut responses before their EOS. The unknown token, never
    sampled in practice, takes its place, so the vocabulary (and the model) stays unchanged.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise ValueError(f"{model_dir}: no token to pad with other than EOS")
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def ppo_config(job: dict, output_dir: str) -> PPOConfig:
    """One rollout of all prompts per iteration; ``minibatches`` optimizer steps per epoch; on the CPU, in fp32
    or (``bf16``) under bf16 autocast over float32 weights."""
    batch = len(job["prompts"])
    return PPOConfig(
        output_dir=output_dir, total_episodes=batch * job["iterations"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_mini_batches=job["minibatches"], num_ppo_epochs=job["epochs"],
        local_rollout_forward_batch_size=batch, response_length=job["response_tokens"], stop_token="eos",
        temperature=job["temperature"], learning_rate=job["learning_rate"], lr_scheduler_type="constant",
        seed=job["seed"], num_sample_generations=0, report_to="none", save_strategy="no", eval_strategy="no",
        bf16=job["bf16"], fp16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True,
    )


def build_trainer(job: dict, clock: PhaseClock, output_dir: str) -> PPOTrainer:
    """TRL's trainer: policy and reference from ``model_dir``, value and reward models from ``reward_dir``."""
    tokenizer = load_tokenizer(job["model_dir"])
    policy, reference = (AutoModelForCausalLM.from_pretrained(job["model_dir"]) for _ in range(2))
    value, reward = (AutoModelForSequenceClassification.from_pretrained(job["reward_dir"], num_labels=1)
                     for _ in range(2))
    clock.reward_model = reward
    trainer = PPOTrainer(
        args=ppo_config(job, output_dir), processing_class=tokenizer, model=policy, ref_model=reference,
        reward_model=reward, value_model=value, train_dataset=Dataset.from_dict({"input_ids": job["prompts"]}),
        callbacks=[clock],
    )
    clock.watch(trainer.optimizer.optimizer)  # the torch optimizer inside accelerate's wrapper
    return trainer


def instrument(clock: PhaseClock) -> None:
    """Route the trainer module's sampling, scoring and forward functions through ``clock``."""
    trl_ppo.batch_generation = clock.sampling(trl_ppo.batch_generation)
    trl_ppo.get_reward = clock.scoring(trl_ppo.get_reward)
    trl_ppo.forward = clock.update_start(trl_ppo.forward)


def main() -> None:
    """Read the job from stdin, train, print the timings as one JSON line."""
    job = json.load(sys.stdin)
    torch.manual_seed(job["seed"])
    clock = PhaseClock(eos_token_id=load_tokenizer(job["model_dir"]).eos_token_id)
    instrument(clock)
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(sys.stderr):
        build_trainer(job, clock, output_dir).train()
    versions = {name: importlib.metadata.version(name) for name in PACKAGES}
    print(json.dumps({"versions": versions, "threads": torch.get_num_threads(), "iterations": clock.iterations}))


if __name__ == "__main__":
    main()
