"""TRL's side of ``benchmarks.learning_tasks``: ``trl.GRPOTrainer`` (``trl==1.16.0``) on a task for a time budget.

Runs inside TRL's own virtual environment and imports nothing from lm_gym but its answer checker
(``lm_gym/tasks/answers.py``, plain Python, loaded from its file so that both sides check answers with
the same code). It reads one JSON job from stdin:

- ``model_dir``; ``prompts``, the chat-formatted prompt texts, with ``prompt_ids`` (lm_gym's token ids of
  each, which TRL's tokenisation must reproduce) and ``answers``; ``answers_module``, ``format_credit``;
- the settings: ``group_size``, ``prompts_per_iteration``, ``minibatches``, ``epochs``, ``response_tokens``,
  ``kl_coef``, ``learning_rate``, ``max_grad_norm``, ``clip_range``, ``lora_rank``, ``bf16``, ``seed``;
- ``minutes`` of training, a LoRA adapter saved into ``out_dir`` every ``checkpoint_minutes`` and at the end.

It prints one JSON line: package versions, per iteration (one generation batch and its epochs) the seconds
and the batch's mean reward, and the checkpoints with their training seconds (the time spent saving them
is not counted). TRL's own log lines go to stderr.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

PACKAGES = ("trl", "torch", "transformers", "accelerate", "peft", "datasets")


def load_checker(path: str):
    """lm_gym's answer module, loaded from its file."""
    spec = importlib.util.spec_from_file_location("lm_gym_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_reward(answers_module: str, format_credit: float, batch_means: list):
    """TRL's reward function: 1 for a correct last number, ``format_credit`` for a wrong one, 0 without one
    (lm_gym's ``TaskReward`` on its arithmetic tasks); each call's mean is appended to ``batch_means``."""
    checker = load_checker(answers_module)

    def reward(prompts, completions, answer, **kwargs):
        scores = []
        for completion, expected in zip(completions, answer):
            found = checker.last_number(completion)
            correct = found is not None and checker.numbers_equal(found, expected)
            scores.append(1.0 if correct else format_credit if found is not None else 0.0)
        batch_means.append(sum(scores) / len(scores))
        return scores

    return reward


class TimeBudget(TrainerCallback):
    """Ends training after ``minutes`` of it, saves the adapter every ``checkpoint_minutes``, and records each
    iteration (``steps_per_iteration`` optimizer steps) with its seconds; saving is not counted."""

    def __init__(self, job: dict, steps_per_iteration: int):
        self.job, self.steps_per_iteration = job, steps_per_iteration
        self.out_dir = Path(job["out_dir"])
        self.iterations, self.checkpoints = [], []
        self.next_checkpoint = job["checkpoint_minutes"] * 60

    def on_train_begin(self, args, state, control, **kwargs):
        self.elapsed, self.started = 0.0, time.perf_counter()
        self.iteration_started = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed += time.perf_counter() - self.started
        if state.global_step % self.steps_per_iteration == 0:
            self.iterations.append({"end_s": self.elapsed, "iteration_s": self.elapsed - self.iteration_started})
            self.iteration_started = self.elapsed
            done = self.elapsed >= self.job["minutes"] * 60
            if done or self.elapsed >= self.next_checkpoint:
                self.save(kwargs["model"])
                self.next_checkpoint += self.job["checkpoint_minutes"] * 60
            control.should_training_stop = done
        self.started = time.perf_counter()

    def save(self, model) -> None:
        directory = self.out_dir / f"{len(self.checkpoints):02d}"
        model.save_pretrained(directory)
        self.checkpoints.append({"train_s": self.elapsed, "iteration": len(self.iterations), "adapter": str(directory)})


def check_tokenisation(tokenizer, job: dict) -> None:
    """TRL tokenises the prompt texts itself; they must give lm_gym's ids, so both sides see the same tokens."""
    for text, ids in zip(job["prompts"], job["prompt_ids"]):
        if tokenizer(text=text)["input_ids"] != ids:
            raise SystemExit(f"TRL's tokenisation of {text!r:.80} differs from lm_gym's ids")


def make_config(job: dict, batch: int) -> GRPOConfig:
    """GRPOConfig with the job's settings: ``minibatches`` optimizer steps per epoch over each generation
    batch of ``prompts_per_iteration * group_size`` completions, ``epochs`` epochs (TRL's ``num_iterations``)."""
    return GRPOConfig(
        output_dir=str(Path(job["out_dir"]) / "trainer"), use_cpu=True, bf16=job["bf16"], seed=job["seed"],
        per_device_train_batch_size=batch // job["minibatches"], gradient_accumulation_steps=1,
        steps_per_generation=job["minibatches"], num_generations=job["group_size"], num_iterations=job["epochs"],
        max_completion_length=job["response_tokens"], temperature=1.0, beta=job["kl_coef"], epsilon=job["clip_range"],
        loss_type="dapo", scale_rewards="group", learning_rate=job["learning_rate"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=job["max_grad_norm"], max_steps=1_000_000,
        save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )


def main() -> None:
    """Train for the job's minutes and print the JSON line."""
    job = json.loads(sys.stdin.read())
    torch.manual_seed(job["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    check_tokenisation(tokenizer, job)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    batch = job["prompts_per_iteration"] * job["group_size"]
    budget = TimeBudget(job, steps_per_iteration=job["minibatches"] * job["epochs"])
    rank, rewards = job["lora_rank"], []
    trainer = GRPOTrainer(
        model=model, reward_funcs=task_reward(job["answers_module"], job["format_credit"], rewards),
        args=make_config(job, batch), train_dataset=Dataset.from_dict({"prompt": job["prompts"], "answer": job["answers"]}),
        processing_class=tokenizer, callbacks=[budget],
        peft_config=LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    for iteration, reward in zip(budget.iterations, rewards):
        iteration["reward"] = reward
    print(json.dumps({"versions": {p: importlib.metadata.version(p) for p in PACKAGES},
                      "threads": torch.get_num_threads(), "iterations": budget.iterations,
                      "checkpoints": budget.checkpoints}))


if __name__ == "__main__":
    main()
