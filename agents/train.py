"""``lm-gym train``: LMPPO (or a critic-free agent: GRPO, RLOO, REINFORCE++) on a LanguageModelEnv, with a run
directory a person can read; on the default prompts and reward, or on a verifiable task (``--task``).

The run directory holds ``config.toml``, TensorBoard logs (``tb/``), ``metrics.csv``, ``curves.png``,
``samples.md`` (held-out responses before and after), the SB3 checkpoint (``checkpoint.zip`` and
``state.json``) and the exported HF model (``model/``). Training goes in iterations (one rollout and its
PPO epochs); each iteration reseeds from (seed, iteration) and starts fresh episodes, so an interrupted
run (Ctrl-C saves the state at the start of the interrupted iteration) resumes to the same final weights.

Under ``torchrun`` (or ``lm-gym train --nproc K``) the run is data-parallel: each of the K ranks steps
``num_envs / K`` env rows with its own seeds, and rank 0 alone evaluates, logs, checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger
from tqdm import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from agents import distributed
from agents.callbacks import RefreshRewardCallback, ReleaseMemoryCallback
from agents.critic_free import GRPO, RLOO, ReinforcePlusPlus
from agents.evaluation import evaluate
from agents.export import export_pretrained
from agents.heap import release_freed_memory
from agents.ppo import LMPPO
from agents.run_report import append_metrics, write_report
from lm_gym.data import default_prompts, load_prompts
from lm_gym.precision import Precision, resolve_precision
from lm_gym.rewards import BlendedReward, FeedbackReward, FluencyReward, MissingEOSPenalty, WeightedSum
from lm_gym.sb3 import SB3VecEnv
from lm_gym.tasks import TRAIN_PROBLEMS, make_task

BRIEF_ANSWERS = "You are a helpful assistant. Keep every answer brief: at most three sentences."
LORA_LEARNING_RATE, FULL_LEARNING_RATE = 2e-4, 1e-5  # learning_rate's defaults
AGENTS = {"ppo": LMPPO, "grpo": GRPO, "rloo": RLOO, "reinforce++": ReinforcePlusPlus}
GROUP_SIZE = 8  # group_size's default for the group-relative algorithms (grpo, rloo)
TOOL_RESULT_TOKENS = 48  # longest tool result turn kept in full (a longer one is cut, with a marker)
PROMPT_TOKENS, TOOL_PROMPT_TOKENS = 96, 640  # max_prompt_tokens' defaults: the tools' instructions take room


@dataclass
class TrainConfig:
    """Settings of a training run (every field is a ``lm-gym train`` flag and a ``config.toml`` key)."""

    model: str = "default"
    algo: str = "ppo"
    task: str | None = None
    prompts: str | None = None
    alpha: float = 0.5
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = None
    max_turns: int = 3
    num_envs: int = 32
    iterations: int = 6
    learning_rate: float | None = None
    value_learning_rate: float = 1e-3
    n_epochs: int = 2
    batch_size: int = 128
    minibatches: int | None = None
    episodes_per_row: int | None = None
    micro_batch_tokens: int = 512
    kl_coef: float = 0.05
    kl_target: float | None = None
    group_size: int | None = None
    kl: str | None = None
    loss_normalization: str = "token"
    critic_warmup: int = 1
    temperature: float = 1.0
    lora_rank: int = 16
    system_prompt: str | None = BRIEF_ANSWERS
    missing_eos_penalty: float = 0.5
    eval_prompts: int = 16
    eval_samples: int = 4
    seed: int = 0
    device: str | None = None
    precision: str | None = None
    feedback_db: str | None = None

    HELP: ClassVar[dict[str, str]] = {  # one line of meaning per field: the flags' --help
        "model": "the policy and reference LM: 'default' (SmolLM2-135M-Instruct), 'tiny', a directory or a hub id",
        "algo": "the agent: 'ppo' (LMPPO, with a critic), or critic-free 'grpo', 'rloo' or 'reinforce++'",
        "task": "a verifiable task instead of the prompts and blended reward: 'addition', 'multiplication', "
                "'reverse', 'calculator' (with a calculator tool) or 'reasoning-gym:NAME'; reward 1 for a correct answer",
        "prompts": "training prompts: a .txt/.jsonl file (default: the 240 shipped prompts); the last "
                   "eval_prompts are held out",
        "alpha": "weight of the human-feedback reward r_f in r = alpha*r_f + (1-alpha)*fluency",
        "max_new_tokens": "response length limit in tokens (also the rollout length per iteration)",
        "max_prompt_tokens": f"prompt length limit in tokens (default {PROMPT_TOKENS}, {TOOL_PROMPT_TOKENS} on a task "
                             "with tools); longer prompts keep their last tokens, except that a prompt with tools' "
                             "instructions in it is never cut (it is an error)",
        "max_turns": "agent turns per episode of a task with tools (calls, then the answer); the rollout then "
                     "takes max_turns * max_new_tokens steps",
        "num_envs": "episodes per rollout, stepped together in one batched forward",
        "iterations": "rollout + update iterations",
        "learning_rate": "learning rate of the LM (default: 2e-4 for LoRA adapters, 1e-5 for full fine-tuning)",
        "value_learning_rate": "learning rate of the value head",
        "n_epochs": "PPO epochs over each rollout",
        "batch_size": "tokens per PPO minibatch",
        "minibatches": "optimizer steps per epoch, each on an equal share of the episodes (instead of batch_size "
                       "tokens per minibatch)",
        "episodes_per_row": "end each rollout once every row has ended this many episodes (1: num_envs / group_size "
                            "prompts per iteration, however short the responses); default: max_new_tokens steps per "
                            "row, rows starting new episodes as theirs end",
        "micro_batch_tokens": "most positions (context, response, padding) per training forward: larger minibatches "
                              "accumulate gradients over several forwards (less memory, the same update)",
        "kl_coef": "beta of the per-token KL penalty to the reference model",
        "kl_target": "adapt beta towards this mean KL per episode (default: beta stays fixed; ppo only)",
        "group_size": f"episodes per prompt, compared with each other by grpo and rloo (default {GROUP_SIZE} for "
                      "those, else 1); num_envs must be a multiple",
        "kl": "where the critic-free agents put the KL: 'reward' (k1), 'loss' (k3) or 'full' (exact over the "
              "vocabulary); default: 'loss' for grpo, 'reward' for rloo and reinforce++",
        "loss_normalization": "critic-free loss mean: 'token' (over all tokens) or 'sequence' (per episode first)",
        "critic_warmup": "first iterations that train only the value head",
        "temperature": "sampling temperature of the policy (pi = softmax(logits / temperature))",
        "lora_rank": "LoRA rank on all linear layers sharing the env's weights (0: full fine-tuning)",
        "system_prompt": "system message before every prompt given as text (empty: none, the chat template's own)",
        "missing_eos_penalty": "subtracted from the reward of a response cut at max_new_tokens without ending",
        "eval_prompts": "held-out prompts for the before/after evaluation",
        "eval_samples": "responses sampled per held-out prompt",
        "seed": "seed of prompts, sampling and updates (the run is deterministic on one machine)",
        "device": "where the LMs run, e.g. 'cpu' or 'cuda' (default: CUDA when available)",
        "precision": "'auto' (bf16 where the hardware runs it fast), 'bf16' or 'fp32' (default: $LM_GYM_PRECISION, "
                     "else 'auto'); config.toml records the choice and why",
        "feedback_db": "a feedback store URL (lm-gym feedback serve --db): r_f reads its ratings as they arrive "
                       "instead of the shipped feedback set",
    }

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read a TOML file of fields; ``overrides`` (not None) take precedence."""
        data = tomllib.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_toml(self, comments: dict[str, str] | None = None) -> str:
        """The config as TOML (fields that are None are left out), ``comments`` after their fields' lines."""
        lines = []
        for key, value in dataclasses.asdict(self).items():
            if value is not None:
                comment = f"  # {comments[key]}" if comments and key in comments else ""
                lines.append(f"{key} = {json.dumps(value)}{comment}")
        return "\n".join(lines) + "\n"

    def resolved(self) -> tuple["TrainConfig", Precision]:
        """This config with ``precision`` resolved (``"auto"`` becomes what it picks here), the learning rate's
        and the group size's defaults filled in, and the :class:`lm_gym.precision.Precision` with its reason."""
        if self.algo not in AGENTS:
            raise ValueError(f"algo={self.algo!r}; expected one of {sorted(AGENTS)}")
        if self.algo == "ppo" and self.kl is not None:
            raise ValueError("kl= places the critic-free agents' KL; ppo puts it in the reward (kl_coef)")
        precision = resolve_precision(self.precision, self.device)
        learning_rate = self.learning_rate
        if learning_rate is None:
            learning_rate = LORA_LEARNING_RATE if self.lora_rank else FULL_LEARNING_RATE
        group_size = self.group_size or (GROUP_SIZE if self.algo in ("grpo", "rloo") else 1)
        prompt_tokens = self.max_prompt_tokens or prompt_budget(self.task is not None and bool(make_task(self.task).tools))
        return dataclasses.replace(self, precision=precision.name, learning_rate=learning_rate,
                                   group_size=group_size, max_prompt_tokens=prompt_tokens), precision


def prompt_budget(with_tools: bool) -> int:
    """``max_prompt_tokens``' default: room for the tools' instructions in the prompt when there are tools."""
    return TOOL_PROMPT_TOKENS if with_tools else PROMPT_TOKENS


def split_prompts(config: TrainConfig) -> tuple[list, list]:
    """(training prompts, held-out prompts): the last ``eval_prompts`` of the list are held out."""
    prompts = default_prompts() if config.prompts is None else load_prompts(config.prompts).prompts
    if prompts is None or len(prompts) <= config.eval_prompts:
        raise ValueError(f"need more than eval_prompts={config.eval_prompts} prompts in a list or file")
    return prompts[: -config.eval_prompts], prompts[-config.eval_prompts :]


@dataclass
class TrainingData:
    """What the policy trains on: training and held-out prompts, a factory of the reward (one per env), and the
    tools the agent may call (a task's; the episodes are multi-turn when there are any)."""

    train_prompts: list
    eval_prompts: list
    reward: Callable[[], object]
    tools: tuple = ()


def training_data(config: TrainConfig) -> TrainingData:
    """The configured task's problems and checker (:mod:`lm_gym.tasks`; ``eval_prompts`` held-out problems),
    else the configured prompts (default: the shipped set) with the default blend r = α·r_f + (1-α)·fluency."""
    if config.task is not None:
        if config.prompts is not None:
            raise ValueError("give a task or prompts, not both: a task brings its own problems")
        task = make_task(config.task)
        train, held_out = task.problems("train", TRAIN_PROBLEMS, at_most=True), task.problems("eval", config.eval_prompts)
        return TrainingData([p.prompt for p in train], [p.prompt for p in held_out],
                            lambda: task.reward([*train, *held_out]), tuple(task.tools))
    train_prompts, eval_prompts = split_prompts(config)
    return TrainingData(train_prompts, eval_prompts, lambda: default_blend(config.alpha, config.feedback_db))


def default_blend(alpha: float, feedback_db: str | None = None) -> BlendedReward:
    """r = α·r_f + (1-α)·fluency under the reference LM; r_f over the shipped feedback set, or over the live
    store at ``feedback_db`` (:meth:`FeedbackReward.from_store`)."""
    feedback = FeedbackReward("default") if feedback_db is None else FeedbackReward.from_store(feedback_db)
    return BlendedReward(feedback, FluencyReward(), alpha=alpha)


def with_missing_eos_penalty(reward, penalty: float):
    """``reward`` minus ``penalty`` for a response cut at the length limit (:class:`MissingEOSPenalty`), as one
    :class:`WeightedSum` whose components are the reward's own and ``missing_eos``; ``reward`` itself when
    the penalty is 0."""
    if not penalty:
        return reward
    terms = list(zip(reward.weights, reward.rewards)) if isinstance(reward, WeightedSum) else [(1.0, reward)]
    return WeightedSum([*terms, (penalty, MissingEOSPenalty())], getattr(reward, "normalize", False),
                       name=getattr(reward, "name", "reward"))


def make_env(config: TrainConfig, prompts: list, num_envs: int, model, tokenizer, reward=None,
             group_size: int = 1, tools: tuple = ()) -> SB3VecEnv:
    """The training or evaluation env: ``reward`` (default: :func:`default_blend`) with the missing-EOS penalty;
    with ``tools``, episodes of up to ``max_turns`` agent turns in which the env runs the agent's tool calls.

    Both score each token with the reference as it is taken: the KL penalty and the fluency reward read
    those log-probs, which in bf16 come from the same decode as the policy's (an untrained policy's KL is
    0 to float32 rounding, :mod:`agents.rollout_cache`), and one decode step costs less than scoring the episodes again.
    """
    reward = reward if reward is not None else default_blend(config.alpha, config.feedback_db)
    multi_turn, prompt_tokens = None, config.max_prompt_tokens or prompt_budget(bool(tools))
    if tools:  # room for the prompt (with the tools' instructions) and every turn, each with a tool result
        context = prompt_tokens + config.max_turns * (config.max_new_tokens + TOOL_RESULT_TOKENS)
        multi_turn = dict(max_turns=config.max_turns, context_tokens=context, max_reply_tokens=TOOL_RESULT_TOKENS)
    return SB3VecEnv(
        num_envs, group_size=group_size, model=model, tokenizer=tokenizer, prompts=prompts,
        reward=with_missing_eos_penalty(reward, config.missing_eos_penalty),
        max_new_tokens=config.max_new_tokens, max_prompt_tokens=prompt_tokens,
        truncate_prompt=None if tools else "left", system_prompt=config.system_prompt, device=config.device,
        precision=config.precision, tools=list(tools) or None, multi_turn=multi_turn,
    )


def make_rank_env(config: TrainConfig, data: TrainingData) -> SB3VecEnv:
    """This rank's training env: ``num_envs / K`` of the rows when K ranks train data-parallel (all of them in
    one process), on the training prompts and reward, in prompt groups of ``group_size`` rows."""
    ranks = distributed.world_size()
    if config.num_envs % ranks:
        raise ValueError(f"num_envs={config.num_envs} does not split evenly over {ranks} ranks")
    return make_env(config, data.train_prompts, config.num_envs // ranks, config.model, None, data.reward(),
                    config.group_size or 1, data.tools)


def rollout_steps(config: TrainConfig, env: SB3VecEnv) -> int:
    """Steps of every row per rollout: room for a whole episode, ``max_new_tokens`` per agent turn."""
    multi_turn = env.venv.config.multi_turn
    return config.max_new_tokens * (multi_turn.max_turns if multi_turn else 1)


def make_agent(config: TrainConfig, env: SB3VecEnv) -> LMPPO:
    """The configured agent (``algo``) with the run's settings; the policy starts from the same model as the
    env (the reference)."""
    settings = dict(
        env=env, n_steps=rollout_steps(config, env), batch_size=config.batch_size,
        micro_batch_tokens=config.micro_batch_tokens, minibatches=config.minibatches,
        episodes_per_row=config.episodes_per_row, n_epochs=config.n_epochs,
        learning_rate=config.learning_rate, kl_coef=config.kl_coef, seed=config.seed, device=config.device or "auto",
        policy_kwargs=policy_kwargs(config, env),
    )
    if config.algo == "ppo":
        return LMPPO(kl_target=config.kl_target, critic_warmup=config.critic_warmup, **settings)
    if config.kl is not None:
        settings["kl"] = config.kl
    return AGENTS[config.algo](loss_normalization=config.loss_normalization, **settings)


def policy_kwargs(config: TrainConfig, env: SB3VecEnv) -> dict:
    """The Transformer policy's settings. With LoRA the adapters go into the env's LM itself: one copy of
    the base weights, which the env runs with the adapters off. Full fine-tuning trains a copy."""
    kwargs = {"model": config.model, "temperature": config.temperature, "device": config.device,
              "learning_rates": {"value": config.value_learning_rate}, "precision": config.precision}
    if config.lora_rank:
        kwargs.update(model=env.model, tokenizer=env.tokenizer, lora={
            "r": config.lora_rank, "lora_alpha": 2 * config.lora_rank, "target_modules": "all-linear"})
    return kwargs


def run(config: TrainConfig, run_dir: Path, resume: bool = False, data: TrainingData | None = None) -> dict:
    """Train (or resume) into ``run_dir`` on ``data`` (default :func:`training_data`); return the before/after
    evaluation (on rank 0; other ranks of a data-parallel run return the iteration count only)."""
    distributed.setup()
    main = distributed.is_main()
    config, precision = config.resolved()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml({"precision": precision.reason}))
    data = data or training_data(config)
    eval_prompts = data.eval_prompts * config.eval_samples
    env = make_rank_env(config, data)
    eval_env = None
    if main:  # rank 0 alone evaluates
        eval_env = make_env(config, eval_prompts, len(eval_prompts), env.model, env.tokenizer, data.reward(),
                            tools=data.tools)
    if resume:
        if not (run_dir / "checkpoint.zip").is_file():
            raise FileNotFoundError(f"{run_dir} has no checkpoint.zip to resume from")
        agent = AGENTS[config.algo].load(run_dir / "checkpoint", env=env, device=config.device or "auto",
                           custom_objects={"policy_kwargs": policy_kwargs(config, env)})
        state = json.loads((run_dir / "state.json").read_text())
    else:
        agent = make_agent(config, env)
        state = {"iteration": 0, "before": evaluate(agent, eval_env, eval_prompts, config.seed) if main else None}
    agent.set_logger(_logger(run_dir) if main else Logger(None, []))
    progress = tqdm(range(state["iteration"], config.iterations), initial=state["iteration"], total=config.iterations,
                    desc="lm-gym train", disable=None if main else True)
    for iteration in progress:
        snapshot = agent.training_state() if main else None
        try:
            train_iteration(agent, env, config, iteration)
        except KeyboardInterrupt:
            if main:
                agent.load_training_state(snapshot)
                _save_state(run_dir, agent, {**state, "iteration": iteration})
                print(f"\ninterrupted: state saved at iteration {iteration}; resume with lm-gym train --resume {run_dir}",
                      file=sys.stderr)
            raise
        if main:
            append_metrics(run_dir, iteration, agent)
        values = agent.logger.name_to_value
        progress.set_postfix(reward=f"{values.get('rollout/reward_mean', float('nan')):.3f}",
                             kl=f"{values.get('rollout/kl_per_segment', float('nan')):.3f}")
        agent.logger.dump(step=agent.num_timesteps)
    state = {**state, "iteration": config.iterations}
    if main:
        release_freed_memory()
        state["after"] = evaluate(agent, eval_env, eval_prompts, config.seed)
        _save_state(run_dir, agent, state)
        export_pretrained(agent, run_dir / "model")
        write_report(run_dir, state)
    distributed.barrier()  # every rank ends once rank 0 has written the run
    return state


def train_iteration(agent: LMPPO, env: SB3VecEnv, config: TrainConfig, iteration: int) -> None:
    """One rollout + PPO epochs, reseeded from (seed, iteration) with fresh episodes; the reward takes in new
    data (a live feedback store's ratings) as the rollout starts, and freed heap memory goes back to the
    system before the rollout and before the update.

    Data-parallel, rank r's rows take the env seeds that rows r·n ... of a single process with all
    ``config.num_envs`` rows would take, and its own sampling seed.
    """
    rank = distributed.rank()
    torch.manual_seed(config.seed * 100_003 + iteration + rank * 1_000_003)
    env.seed(config.seed * 100_003 + iteration * config.num_envs + rank * env.num_envs)
    agent.reset_episodes()
    # total_timesteps=1: one rollout (whatever its length; see episodes_per_row) and its update
    agent.learn(total_timesteps=1, reset_num_timesteps=False,
                tb_log_name="lmppo", callback=CallbackList([RefreshRewardCallback(env), ReleaseMemoryCallback()]))


def _save_state(run_dir: Path, agent: LMPPO, state: dict) -> None:
    agent.save(run_dir / "checkpoint")
    (run_dir / "state.json").write_text(json.dumps(state, indent=1))


def _logger(run_dir: Path):
    from stable_baselines3.common.logger import configure

    return configure(str(run_dir / "tb"), ["tensorboard"])


def timed_run(config: TrainConfig, run_dir: Path, resume: bool = False, data: TrainingData | None = None) -> dict:
    """:func:`run`, printing the before/after summary and the wall time."""
    started = time.perf_counter()
    state = run(config, run_dir, resume, data)
    if not distributed.is_main():
        return state
    for label in ("before", "after"):
        record = state[label]
        parts = ", ".join(f"{k}={v:.3f}" for k, v in record["components"].items())
        print(f"{label}: reward {record['reward']:.3f} ± {record['reward_stderr']:.3f} ({parts}), KL {record['kl']:.3f}, "
              f"length {record['length']:.0f} chars, EOS rate {record['eos_rate']:.0%}")
    print(f"run directory: {run_dir} ({time.perf_counter() - started:.0f} s)")
    return state
