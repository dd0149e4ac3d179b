"""RLlib (new API stack) agent side: the Transformer as an RLModule, its PPO learner, and ``ppo_config``.

:class:`TransformerRLModule` is a thin shell around :class:`agents.actor_critic.TransformerActorCritic`
(LM-head logits as action-distribution inputs, a value head for V(s)); :func:`ppo_config` wires it to the
env registered by :func:`lm_gym.integrations.rllib.register_env` with LM-sensible PPO defaults::

    import ray
    from agents.integrations.rllib import ppo_config

    ray.init()
    config = ppo_config(
        {"model": "tiny", "max_new_tokens": 16, "reward": my_reward},   # LanguageModelEnv keywords
        {"lora": {"r": 8}, "learning_rates": {"value": 1e-3}},          # TransformerActorCritic keywords
    ).env_runners(num_env_runners=2)
    algo = config.build_algo()
    for _ in range(10):
        result = algo.train()
        print(result["env_runners"]["episode_return_mean"])

The reward must be importable on every Ray worker (a module-level function or class, not a lambda defined
in ``__main__`` of another machine). The policy LM defaults to the env's ``model``.

The same script runs on a Ray cluster: start the head with ``ray start --head`` on one machine and
``ray start --address=HEAD_IP:6379`` on the others, replace ``ray.init()`` by ``ray.init(address="auto")``,
and scale with ``config.env_runners(num_env_runners=16)`` (rollout workers, one env and one inference copy
of the LM each) and ``config.learners(num_learners=4, num_gpus_per_learner=1)`` (data-parallel learners,
gradients averaged by torch DDP). Every node needs lm-gym installed (or a ``runtime_env``).

With ``allowed_token_ids`` in the env config, observations follow RLlib's action-masking convention:
``{"action_mask": (V,) 0/1, "observations": {"input_ids", "attention_mask"}}``; the module then gives
disallowed tokens a huge negative logit (zero probability, finite entropy).
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from agents.actor_critic import PARTS, TransformerActorCritic, token_batch
from agents.reward_model import critic_start
from agents.rollout_cache import RolloutCache
from lm_gym.integrations.rllib import ENV_NAME, register_env, split_observation
from lm_gym.logprobs import mask_logits

# TransformerActorCritic.from_pretrained keywords the module passes on (the documented model_config keys)
ACTOR_CRITIC_KEYS = ("model", "tokenizer", "value_head", "value_model", "lora", "temperature", "device")
MODULE_KEYS = ACTOR_CRITIC_KEYS + ("learning_rates", "value_batch_size")


class TransformerRLModule(TorchRLModule, ValueFunctionAPI):
    """An RLlib RLModule around one :class:`TransformerActorCritic`.

    ``model_config`` keys (others, such as RLlib's auto-included ``vf_share_layers``, are ignored):

    :param model: the policy LM (``"default"``, ``"tiny"``, a directory or a hub id).
    :param value_head: ``"shared"`` or ``"separate"`` (see the SB3 policy).
    :param value_model: the backbone of a separate value head (an LM or a reward model directory).
    :param lora: ``None`` (full fine-tuning) or a dict of peft ``LoraConfig`` fields.
    :param temperature: π(a|s) = softmax(logits / temperature).
    :param device: device of the LM; default CUDA when visible (Ray hides GPUs a worker was not given).
    :param learning_rates: ``{"body", "head", "value"}`` learning rates, read by :class:`TransformerPPOLearner`.
    :param value_batch_size: rows per forward when V is computed without embeddings (GAE); default 64.

    Rollout forwards (no gradients) run only the new token of each row through a KV cache; the train forward
    is one full forward whose critic hidden state (``embeddings``) :meth:`compute_values` turns into V(s).
    """

    def setup(self):
        config = dict(self.model_config or {})
        kwargs = {key: config[key] for key in ACTOR_CRITIC_KEYS if key in config}
        self.value_batch_size = int(config.get("value_batch_size", 64))
        self.learning_rates = dict(config.get("learning_rates") or {})
        unknown = set(self.learning_rates) - set(PARTS)
        if unknown:
            raise ValueError(f"learning_rates has unknown parts {sorted(unknown)}; expected among {PARTS}")
        kwargs["value_model"], kwargs["value_init"] = critic_start(kwargs.get("value_model"), kwargs.get("device"))
        self.actor_critic = TransformerActorCritic.from_pretrained(**kwargs)
        self.rollout_cache = RolloutCache()  # the env runner's episodes; new weights invalidate it by themselves
        self.train(False)  # rollouts run in eval mode; forward_train switches once on learners

    def train(self, mode: bool = True) -> TransformerRLModule:
        """Switch modes only on a change (RLlib calls ``eval()`` around every rollout forward)."""
        return self if mode == self.training else super().train(mode)

    def _tokens(self, obs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ids, mask, action_mask = split_observation(obs)
        return *token_batch(ids, mask, self.actor_critic.lm.device), action_mask

    def _forward(self, batch, **kwargs):
        """Action logits at the latest token, through the KV cache (called without gradients)."""
        ids, mask, action_mask = self._tokens(batch[Columns.OBS])
        logits, _ = self.actor_critic.act(ids, mask, self.rollout_cache, values=False)
        return {Columns.ACTION_DIST_INPUTS: mask_logits(logits, action_mask)}

    def _forward_train(self, batch, **kwargs):
        """Action logits and the critic's hidden state (``embeddings``), in one full forward with gradients."""
        ids, mask, action_mask = self._tokens(batch[Columns.OBS])
        logits, _, hidden = self.actor_critic.evaluate(ids, mask)
        logits, hidden = logits[:, -1], hidden[:, -1]
        return {Columns.ACTION_DIST_INPUTS: mask_logits(logits, action_mask), Columns.EMBEDDINGS: hidden}

    def compute_values(self, batch, embeddings=None) -> torch.Tensor:
        """V(s) (B,): the value head on ``embeddings`` when given (the loss); else a forward of the critic
        without gradients, ``value_batch_size`` rows at a time (RLlib's GAE connector; no loss calls it so)."""
        if embeddings is not None:
            return self.actor_critic.values_of(embeddings)
        ids, mask, _ = self._tokens(batch[Columns.OBS])
        with torch.no_grad():
            chunks = [
                self.actor_critic.evaluate(ids[i: i + self.value_batch_size], mask[i: i + self.value_batch_size],
                                           logits=False).values[:, -1]
                for i in range(0, ids.shape[0], self.value_batch_size)
            ]
        return torch.cat(chunks) if chunks else ids.new_zeros(0, dtype=torch.float32)


class TransformerPPOLearner(PPOTorchLearner):
    """RLlib's PPO learner with one Adam per part (``body``, ``head``, ``value``) at its own learning rate.

    The rates come from the module's ``model_config["learning_rates"]``; missing parts use ``config.lr``
    (a fixed value or RLlib schedule). RLlib clips gradients per optimizer, so ``grad_clip`` bounds each part.
    """

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self._module[module_id].unwrapped()
        rates = module.learning_rates
        for part, params in module.actor_critic.parameter_groups().items():
            if params:
                self.register_optimizer(
                    module_id=module_id, optimizer_name=part, optimizer=torch.optim.Adam(params), params=params,
                    lr_or_lr_schedule=rates.get(part, config.lr),
                )


# --- config ---------------------------------------------------------------------------------------------


def ppo_config(env_config: dict, model_config: dict | None = None, *, env_name: str = ENV_NAME, **training) -> PPOConfig:
    """A :class:`PPOConfig` for the registered LM env and :class:`TransformerRLModule`.

    Defaults suit LM fine-tuning: lr 1e-5, gamma 1 (the reward comes at the end), GAE lambda 0.95, clip 0.2,
    no entropy bonus and no KL term to the rollout policy (add a reference KL to the reward instead), 4
    epochs over 256-step minibatches of 1024-step batches, value loss 0.5, gradients clipped at norm 1.
    Chain further ``.env_runners(...)``, ``.learners(...)``, ``.training(...)`` calls to change anything.

    :param env_config: ``LanguageModelEnv`` keywords (a picklable reward; see the module docstring).
    :param model_config: :class:`TransformerRLModule` keys; ``model`` defaults to the env's model.
    :param env_name: the name to register the env under.
    :param training: ``PPOConfig.training`` keywords overriding the defaults.
    """
    model_config = {"model": env_config.get("model", "default"), **(model_config or {})}
    unknown = set(model_config) - set(MODULE_KEYS)
    if unknown:
        raise ValueError(f"model_config has unknown keys {sorted(unknown)}; expected among {MODULE_KEYS}")
    defaults = {
        "lr": 1e-5, "gamma": 1.0, "lambda_": 0.95, "clip_param": 0.2, "entropy_coeff": 0.0, "use_kl_loss": False,
        "num_epochs": 4, "minibatch_size": 256, "train_batch_size_per_learner": 1024, "vf_loss_coeff": 0.5,
        "grad_clip": 1.0,
    }
    return (
        PPOConfig()
        .framework("torch")
        .environment(register_env(env_name), env_config=dict(env_config))
        .rl_module(rl_module_spec=RLModuleSpec(module_class=TransformerRLModule, model_config=model_config))
        .learners(learner_class=TransformerPPOLearner)
        .training(**{**defaults, **training})
    )
