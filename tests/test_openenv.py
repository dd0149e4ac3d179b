"""OpenEnv environments as the other party: a real OpenEnv server (the package's own ``create_fastapi_app``,
served by uvicorn on 127.0.0.1 in a thread) runs a small password game; its reset observation is the prompt,
the agent's turn text is its action, its next observation is the user's turn, its reward the turn's reward."""

import contextlib
import itertools
import random
import re
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("openenv.core")
import uvicorn  # noqa: E402
from openenv.core import Action, EnvClient, Environment, Observation, State, create_fastapi_app  # noqa: E402
from openenv.core.client_types import StepResult  # noqa: E402

from lm_gym import LanguageModelEnv, LanguageModelVectorEnv  # noqa: E402
from lm_gym.integrations.openenv import OpenEnvParty, default_observation_text  # noqa: E402
from tests.conftest import observed_tokens  # noqa: E402

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach"]  # first letters all differ
WRONG_REWARD = -0.25


class PasswordAction(Action):
    message: str


class PasswordObservation(Observation):
    prompt: str = ""


class PasswordGame(Environment):
    """Say the password (a word drawn from the reset's seed, its first letter given): 1 and the end when the
    turn holds it, else -0.25 and an echo of what was said."""

    SUPPORTS_CONCURRENT_SESSIONS = True
    open_sessions: set = set()  # the numbers of the games the server holds (it runs in this process)
    numbers = itertools.count()

    def __init__(self):
        super().__init__()
        self.secret, self._state, self.number = "", State(step_count=0), next(PasswordGame.numbers)
        PasswordGame.open_sessions.add(self.number)

    def reset(self, seed=None, episode_id=None, **kwargs) -> PasswordObservation:
        self.secret, self._state = random.Random(seed).choice(WORDS), State(episode_id=episode_id, step_count=0)
        return PasswordObservation(prompt=f"Say the password. It starts with '{self.secret[0]}'.")

    def step(self, action: PasswordAction, timeout_s=None, **kwargs) -> PasswordObservation:
        self._state.step_count += 1
        tries = {"tries": self._state.step_count}
        if self.secret in action.message:
            return PasswordObservation(prompt="Correct.", reward=1.0, done=True, metadata=tries)
        return PasswordObservation(prompt=f"Wrong: you said {action.message!r}.", reward=WRONG_REWARD, metadata=tries)

    @property
    def state(self) -> State:
        return self._state

    def close(self) -> None:
        PasswordGame.open_sessions.discard(self.number)


class PasswordClient(EnvClient[PasswordAction, PasswordObservation, State]):
    """A typed client, as OpenEnv's environment packages ship them."""

    def _step_payload(self, action: PasswordAction) -> dict:
        return {"message": action.message}

    def _parse_result(self, payload: dict) -> StepResult[PasswordObservation]:
        observation = PasswordObservation(**payload.get("observation", {}), reward=payload.get("reward"),
                                          done=payload.get("done", False))
        return StepResult(observation, payload.get("reward"), payload.get("done", False))

    def _parse_state(self, payload: dict) -> State:
        return State(**payload)


@contextlib.contextmanager
def serving(max_concurrent_envs: int):
    """The password game served by OpenEnv on a free port of 127.0.0.1: its URL while in the block."""
    app = create_fastapi_app(PasswordGame, PasswordAction, PasswordObservation, max_concurrent_envs=max_concurrent_envs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the OpenEnv server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "the OpenEnv server did not stop"


@pytest.fixture(scope="module")
def url():
    with serving(max_concurrent_envs=4) as address:
        yield address


@pytest.fixture
def party(url):
    party = OpenEnvParty(PasswordClient, base_url=url, action=lambda text: PasswordAction(message=text))
    yield party
    party.close()


def settings(tiny, party, max_turns: int = 4) -> dict:
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, other_party=party, max_new_tokens=20, max_prompt_tokens=200,
                multi_turn=dict(max_turns=max_turns, context_tokens=400, max_reply_tokens=100))


def say(env, text: str) -> tuple:
    """Take the tokens of ``text`` and the stop token as actions: the last step's results."""
    for token in env.tokenizer(text, add_special_tokens=False).input_ids + [env.tokenizer.eos_token_id]:
        result = env.step(token)
    return result


def text_of(env, obs) -> str:
    return env.tokenizer.decode(observed_tokens(obs))


def secret(text: str) -> str:
    """The password the game's prompt in ``text`` hints at."""
    letter = re.search(r"It starts with '(\w)'", text).group(1)
    return next(word for word in WORDS if word[0] == letter)


def test_the_prompt_is_the_envs_reset_observation(tiny, party):
    env = LanguageModelEnv(**settings(tiny, party))
    obs, _ = env.reset(seed=0)
    prompt = re.search(r"Say the password\. It starts with '\w'\.", text_of(env, obs)).group()
    *_, info = say(env, "no idea")
    assert info["turns"][0] == {"role": "user", "text": prompt}


def test_an_agent_turn_is_the_envs_action_and_its_observation_the_users_turn(tiny, party):
    env = LanguageModelEnv(**settings(tiny, party))
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = say(env, "hello there")
    assert (reward, terminated, truncated) == (WRONG_REWARD, False, False)  # the env's reward, the episode goes on
    assert [turn["role"] for turn in info["turns"]] == ["user", "assistant", "user"]
    assert info["turns"][-1]["text"] == "Wrong: you said 'hello there'."  # the agent's text reached the env
    assert "Wrong: you said 'hello there'." in text_of(env, obs)
    record = info["turns"][1]["openenv"]
    assert record["reward"] == WRONG_REWARD and record["done"] is False
    assert record.get("metadata", {"tries": 1}) == {"tries": 1}  # openenv-core 0.3's server drops metadata


def test_the_right_word_is_rewarded_and_done_ends_the_episode(tiny, party):
    env = LanguageModelEnv(**settings(tiny, party))
    obs, _ = env.reset(seed=1)
    word = secret(text_of(env, obs))
    say(env, "is it a plum?")
    _, reward, terminated, truncated, info = say(env, f"it is {word}")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["reward_components"] == {"other_party": 1.0}
    assert [turn["role"] for turn in info["turns"]] == ["user", "assistant", "user", "assistant"]
    assert info["turns"][-1]["openenv"]["done"] is True


def test_running_out_of_turns_truncates_the_episode(tiny, party):
    env = LanguageModelEnv(**settings(tiny, party, max_turns=2))
    env.reset(seed=0)
    assert not any(say(env, "one")[2:4])
    _, reward, terminated, truncated, _ = say(env, "two")
    assert truncated and not terminated and reward == WRONG_REWARD


def test_each_reset_is_seeded_from_the_env_rng(tiny, party):
    env = LanguageModelEnv(**settings(tiny, party))
    prompts = {seed: text_of(env, env.reset(seed=seed)[0]) for seed in range(8)}
    assert text_of(env, env.reset(seed=5)[0]) == prompts[5]
    assert len(set(prompts.values())) > 1


def test_vector_env_rows_have_their_own_sessions(tiny, party):
    envs = LanguageModelVectorEnv(2, **settings(tiny, party))
    obs, _ = envs.reset(seed=3)
    tokenizer = tiny[1]
    prompts = [tokenizer.decode(obs["input_ids"][row][obs["attention_mask"][row] == 1]) for row in (0, 1)]
    right = tokenizer(secret(prompts[0]), add_special_tokens=False).input_ids
    wrong = tokenizer("zzz " * 10, add_special_tokens=False).input_ids[:len(right)]
    for pair in zip(right + [tokenizer.eos_token_id], wrong + [tokenizer.eos_token_id]):  # both turns end together
        obs, reward, terminated, truncated, infos = envs.step(np.array(pair))
    assert terminated.tolist() == [True, False] and not truncated.any()
    assert reward.tolist() == [1.0, WRONG_REWARD]
    assert len(party.clients) == 2 and party.clients[0] is not party.clients[1]


def test_closing_the_env_ends_the_sessions(tiny, url):
    party = OpenEnvParty(PasswordClient, base_url=url, action=lambda text: PasswordAction(message=text))
    before = set(PasswordGame.open_sessions)
    envs = LanguageModelVectorEnv(2, **settings(tiny, party))
    envs.reset(seed=0)
    opened = PasswordGame.open_sessions - before
    assert len(opened) == 2
    envs.close()  # closes its other party
    party.close()  # again: safe
    deadline = time.monotonic() + 10
    while opened & PasswordGame.open_sessions and time.monotonic() < deadline:  # the server ends them soon after
        time.sleep(0.05)
    assert not opened & PasswordGame.open_sessions and party.clients == {}


def test_a_field_name_builds_the_clients_declared_action(tiny, url):
    party = OpenEnvParty(PasswordClient, base_url=url)  # action="message": PasswordAction(message=text)
    try:
        env = LanguageModelEnv(**settings(tiny, party))
        env.reset(seed=0)
        assert say(env, "hi")[-1]["turns"][-1]["text"] == "Wrong: you said 'hi'."
    finally:
        party.close()


def test_the_generic_client_sends_a_dict_and_reads_the_prompt_field(tiny, url):
    party = OpenEnvParty(base_url=url)  # GenericEnvClient: {"message": text} out, a dict observation back
    try:
        env = LanguageModelEnv(**settings(tiny, party))
        obs, _ = env.reset(seed=0)
        assert "Say the password" in text_of(env, obs)
        assert say(env, "hi")[-1]["turns"][-1]["text"] == "Wrong: you said 'hi'."
    finally:
        party.close()


def test_an_action_field_the_client_does_not_declare_is_named(tiny, url):
    party = OpenEnvParty(PasswordClient, base_url=url, action="answer")
    env = LanguageModelEnv(**settings(tiny, party))
    with pytest.raises(TypeError, match="PasswordAction has no field 'answer' .*message"):
        env.reset(seed=0)
    assert party.clients == {}


def test_an_action_function_that_fails_is_named(tiny, url):
    party = OpenEnvParty(PasswordClient, base_url=url, action=lambda text: PasswordAction(answer=text))
    try:
        env = LanguageModelEnv(**settings(tiny, party))
        env.reset(seed=0)
        with pytest.raises(TypeError, match="(?s)action=.*failed on the turn's text 'hi'.*answer"):
            say(env, "hi")
    finally:
        party.close()


def test_too_few_server_sessions_for_the_rows_are_named(tiny):
    with serving(max_concurrent_envs=1) as address:
        party = OpenEnvParty(PasswordClient, base_url=address, action=lambda text: PasswordAction(message=text))
        try:
            with pytest.raises(RuntimeError, match="env row 1.*max_concurrent_envs"):
                LanguageModelVectorEnv(2, **settings(tiny, party)).reset(seed=0)
        finally:
            party.close()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="base_url"):
        OpenEnvParty()
    with pytest.raises(TypeError, match="action="):
        OpenEnvParty(base_url="http://127.0.0.1:1", action=3)
    with pytest.raises(TypeError, match="observation_text="):
        OpenEnvParty(base_url="http://127.0.0.1:1", observation_text="prompt")


def test_the_default_observation_text():
    assert default_observation_text({"prompt": "p", "message": "m"}) == "p"
    assert default_observation_text(PasswordObservation(prompt="hello")) == "hello"
    assert default_observation_text({"echoed_message": "e", "length": 1}) == "e"  # the only string field
    assert default_observation_text("plain") == "plain"
    with pytest.raises(TypeError, match=r"\['a', 'b'\].*observation_text="):
        default_observation_text({"a": "x", "b": "y"})
