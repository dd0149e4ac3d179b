"""OpenEnv environments as the other party of multi-turn lm-gym episodes (``pip install lm-gym[openenv]``).

Each env row holds its own OpenEnv client, so its own session on the env's server: the env's reset observation
is the prompt, every agent turn's text becomes the env's action, and the env's next observation is the user's
turn. Each step's reward is the agent turn's reward (a reward of None counts as 0; the turn's record keeps the
raw value) and ``done`` ends the episode. Each reset is seeded from the row's Gymnasium RNG; the seed reaches
the env only if its ``reset`` takes a ``seed`` (OpenEnv's server drops the keywords the env's reset does not
take). The server must admit one session per row: serve the env with ``max_concurrent_envs`` at least the
number of rows (the default is 1), from an Environment with ``SUPPORTS_CONCURRENT_SESSIONS = True``.

Closing the env closes every row's session (:meth:`OpenEnvParty.close`).

Example::

    from echo_env import EchoAction, EchoEnv
    from lm_gym.integrations.openenv import OpenEnvParty
    party = OpenEnvParty(EchoEnv, base_url="http://localhost:8000", action=lambda text: EchoAction(message=text),
                         observation_text=lambda observation: observation.echoed_message)
    env = gymnasium.make("LanguageModelEnv-v0", other_party=party,
                         multi_turn={"max_turns": 4, "context_tokens": 1024})
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence

import numpy as np
from openenv.core import Action, EnvClient, GenericEnvClient
from websockets.exceptions import ConnectionClosed

from lm_gym.parties import Answer, OtherParty

TEXT_FIELDS = ("prompt", "message", "text", "content")  # the fields a default observation's text comes from


class OpenEnvParty(OtherParty):
    """An OpenEnv environment, one client (one server session) per env row; see the module docstring.

    :param client: an OpenEnv client class (called with ``base_url=``), or, without ``base_url``, a function
        of no arguments that returns a client; None: :class:`openenv.core.GenericEnvClient` (plain dicts).
        Async clients are used through their ``.sync()`` wrapper.
    :param base_url: the env server's address, ``http://host:port`` (or ``ws://``).
    :param action: how an agent turn's text becomes the env's action: a function of the text, or the name of
        the action's text field (the Action class the client declares, ``EnvClient[MyAction, ...]``, is built
        with that field; a client that declares none, such as GenericEnvClient, gets ``{field: text}``). It
        gets every turn's text, the empty one included; an action it cannot make stops the episode with an error.
    :param observation_text: how an observation becomes the text of a turn: a function of the observation;
        None: :func:`default_observation_text`.
    :param reset_kwargs: further keywords for every ``reset`` (besides ``seed``).
    """

    role = "user"

    def __init__(self, client: Callable | None = None, base_url: str | None = None,
                 action: Callable[[str], object] | str = "message",
                 observation_text: Callable[[object], str] | None = None, reset_kwargs: dict | None = None):
        if client is None and base_url is None:
            raise ValueError("give base_url= (the env server's address), or client= a function that returns a client")
        if client is not None and not callable(client):
            raise TypeError(f"client={client!r:.80} is neither a client class nor a function that returns a client")
        if not (callable(action) or isinstance(action, str)):
            raise TypeError(f"action={action!r:.80} is neither a function of the text nor an action field's name")
        if observation_text is not None and not callable(observation_text):
            raise TypeError(f"observation_text={observation_text!r:.80} is not a function of the observation")
        self.make_client, self.base_url = client or GenericEnvClient, base_url
        self.action, self.to_text = action, observation_text or default_observation_text
        self.reset_kwargs = dict(reset_kwargs or {})
        self.make_action: Callable[[str], object] | None = action if callable(action) else None
        self.clients: dict[int, object] = {}

    def start(self, row: int, rng: np.random.Generator) -> str:
        if row not in self.clients:
            self.clients[row] = self._connect()
        result = self._call(row, "reset", seed=int(rng.integers(2**31)), **self.reset_kwargs)
        return self._text(result.observation)

    def answer(self, rows: Sequence[int], texts: Sequence[str], last: Sequence[bool]) -> list[Answer]:
        return [self._play(row, text, final) for row, text, final in zip(rows, texts, last)]

    def _play(self, row: int, text: str, last: bool) -> Answer:
        try:
            action = self.make_action(text)
        except Exception as error:
            name = getattr(self.action, "__qualname__", repr(self.action))
            raise TypeError(f"action={name} failed on the turn's text {text!r:.60}: {error}") from error
        result = self._call(row, "step", action)
        reward, done = 0.0 if result.reward is None else float(result.reward), bool(result.done)
        record = {"reward": result.reward, "done": done}
        metadata = observation_field(result.observation, "metadata")
        if metadata:
            record["metadata"] = metadata
        if done or last:
            return Answer(None, reward, terminated=done, record={"openenv": record})
        return Answer(self._text(result.observation), reward, terminated=False, record={"openenv": record})

    def _connect(self):
        """A new client, synchronous, with ``make_action`` set from it if ``action`` named a field."""
        client = self.make_client(base_url=self.base_url) if self.base_url is not None else self.make_client()
        if isinstance(client, EnvClient):
            client = client.sync()
        elif inspect.isawaitable(client):
            raise TypeError("the client function returned an awaitable: return the client (with openenv >= 0.10, "
                            "call .sync() on the handle that from_env/from_docker_image return)")
        if not all(callable(getattr(client, method, None)) for method in ("reset", "step")):
            raise TypeError(f"{client!r:.80} is not an OpenEnv client: it needs reset() and step(action)")
        if self.make_action is None:
            try:
                self.make_action = field_action(declared_action_class(client), self.action)
            except TypeError:
                client.close()
                raise
        return client

    def _call(self, row: int, method: str, *args, **kwargs):
        try:
            return getattr(self.clients[row], method)(*args, **kwargs)
        except Exception as error:
            full, closed = "CAPACITY_REACHED" in str(error), isinstance(error, ConnectionClosed)
            hint = ("" if not (full or closed) else " (a server that admits fewer sessions than env rows "
                    f"{'refuses' if full else 'may close'} the extra ones: serve it with max_concurrent_envs >= rows)")
            raise RuntimeError(f"OpenEnv {method} failed in env row {row}: {error}{hint}") from error

    def _text(self, observation) -> str:
        text = self.to_text(observation)
        if not isinstance(text, str):
            raise TypeError(f"observation_text gave {type(text).__name__}, not str, for {observation!r:.120}")
        return text

    def close(self) -> None:
        """Close every row's client, which ends its session on the server; safe to call twice."""
        clients, self.clients = self.clients, {}
        for client in clients.values():
            client.close()


def declared_action_class(client) -> type | None:
    """The Action class a typed client declares (``class MyEnv(EnvClient[MyAction, MyObservation, State])``),
    or None (GenericEnvClient and clients of other kinds)."""
    client = getattr(client, "async_client", client)  # a SyncEnvClient's wrapped client
    for base in type(client).__mro__:
        for generic in getattr(base, "__orig_bases__", ()):
            if typing.get_origin(generic) is EnvClient:
                declared = typing.get_args(generic)[0]
                return declared if isinstance(declared, type) and issubclass(declared, Action) else None
    return None


def field_action(action_class: type | None, field: str) -> Callable[[str], object]:
    """The action maker for a text field: ``action_class(field=text)``, or ``{field: text}`` without a class."""
    if action_class is None:
        return lambda text: {field: text}
    if field not in action_class.model_fields:
        fields = ", ".join(action_class.model_fields)
        raise TypeError(f"{action_class.__name__} has no field {field!r} (its fields: {fields}): pass action= the "
                        f"text field's name, or a function such as lambda text: {action_class.__name__}(...)")
    return lambda text: action_class(**{field: text})


def observation_field(observation, name: str):
    """A field of an observation, whether a model (typed clients) or a dict (GenericEnvClient); None if absent."""
    return observation.get(name) if isinstance(observation, dict) else getattr(observation, name, None)


def default_observation_text(observation) -> str:
    """The default text of an observation: the observation itself if it is a string, else its first string field
    among ``prompt``, ``message``, ``text`` and ``content``, else its only string field."""
    if isinstance(observation, str):
        return observation
    fields = (observation if isinstance(observation, dict) else observation.model_dump()
              if hasattr(observation, "model_dump") else getattr(observation, "__dict__", {}))
    texts = {name: value for name, value in fields.items() if isinstance(value, str)}
    for name in TEXT_FIELDS:
        if name in texts:
            return texts[name]
    if len(texts) == 1:
        return next(iter(texts.values()))
    raise TypeError(f"cannot tell the text of a {type(observation).__name__} observation (its string fields: "
                    f"{sorted(texts) or 'none'}): pass observation_text=, a function of the observation")
