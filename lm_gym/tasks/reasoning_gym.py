"""reasoning-gym's procedural datasets as lm-gym tasks (``pip install lm-gym[reasoning]``).

Any of its datasets by name, with its configuration: training problems come from one seed and held-out
problems from another, so the two never share a generator stream. The dataset's own ``score_answer`` checks
an answer (a score of 1 is correct); where it does not, an answer that writes the expected number exactly
(:func:`lm_gym.tasks.answers.numbers_equal`: "+7" and "7.0" for 7) still is.
"""

from __future__ import annotations

from lm_gym.tasks.answers import ANSWER_FORMAT, numbers_equal
from lm_gym.tasks.base import Problem, Task

TRAIN_SEED, EVAL_SEED = 0, 1_000_003  # seed offsets of the two splits


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("reasoning-gym tasks need the reasoning-gym package: pip install 'lm-gym[reasoning]'") from err
    return reasoning_gym


class ReasoningGymTask(Task):
    """The reasoning-gym dataset ``dataset`` as a task.

    :param dataset: a dataset name (``reasoning_gym.factory.DATASETS``), e.g. ``"leg_counting"``.
    :param seed: the base seed; the splits draw from ``seed`` and ``seed + 1000003``.
    :param config: the dataset's configuration keywords (e.g. ``min_animals=2``).
    """

    def __init__(self, dataset: str, seed: int = 0, **config):
        reasoning_gym = _reasoning_gym()
        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"reasoning-gym has no dataset {dataset!r}; it has {sorted(reasoning_gym.factory.DATASETS)}")
        self.dataset, self.seed, self.config, self.name = dataset, seed, config, dataset
        self._scorers: dict[str, object] = {}

    def make_problems(self, split, count, at_most=False):  # reasoning-gym makes as many as asked for
        seed = self.seed + (TRAIN_SEED if split == "train" else EVAL_SEED)
        data = _reasoning_gym().create_dataset(self.dataset, seed=seed, size=count, **self.config)
        self._scorers[split] = data
        return [Problem(f"{entry['question']}\n\n{ANSWER_FORMAT}", str(entry["answer"]), (split, entry))
                for entry in data]

    def is_correct(self, problem, answer):
        split, entry = problem.data
        score = self._scorers[split].score_answer(answer=answer, entry=entry)
        return score >= 1.0 or numbers_equal(answer, problem.answer)
