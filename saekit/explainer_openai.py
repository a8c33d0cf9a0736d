"""An explainer and judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
llama.cpp server, Ollama, ...): ``saekit explain --explainer openai --model NAME --base-url URL``.

``OpenAIExplainer`` has ``LocalExplainer``'s interface (``model_id``, ``generate``,
``yes_probability``) and talks to the endpoint through the ``openai`` client, with a timeout per
request, bounded retries (the client's own, with backoff; connection errors, 408/409/429/5xx), an
optional cap on requests per minute and a few requests in flight at once. Replies are greedy
(temperature 0, a fixed seed) where the server honours it.

P(yes) is read from the chat completion's ``top_logprobs`` of the first answer token: the summed
probability of the yes spellings over that of the yes and no spellings (as ``LocalExplainer``
does over the whole vocabulary; 0.5 when neither is among the top tokens). A server that returns
no log-probabilities cannot judge: that is an ``EndpointError``.

The API key comes from an environment variable (``--api-key-env``, default ``OPENAI_API_KEY``).
When it is unset no key is sent (a placeholder, which local servers ignore), except to OpenAI's
own API, which is refused at once; a server that answers 401/403 gets an error naming the
variable.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from saekit.errors import ConfigError, ModelLoadError
from saekit.explainer_model import NO_WORDS, YES_WORDS, Chat

OPENAI_EXPLAINER = "openai"
OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
OPENAI_PIP = "pip install 'openai>=1.40'"
NO_KEY = "not-set"  # sent when the key variable is unset: servers without keys ignore it
TOP_LOGPROBS = 20  # the most OpenAI's API returns
ENDPOINT_FIELDS = ("model", "base_url", "api_key_env", "request_timeout", "max_retries",
                   "requests_per_minute", "parallel_requests")
YES = {w.strip() for w in YES_WORDS}
NO = {w.strip() for w in NO_WORDS}


class EndpointError(ModelLoadError):
    """An endpoint that cannot be reached, refuses the requests, or lacks what the judge needs."""


def import_openai():
    """The ``openai`` package, or ``ModelLoadError`` saying how to install it."""
    try:
        import openai
    except ImportError as err:
        raise ModelLoadError(f"--explainer openai needs the openai package ({err}); install it "
                             f"with: {OPENAI_PIP}") from None
    return openai


def api_key(base_url: str, env: str) -> str:
    """The key in ``$env``; unset, a placeholder, except for OpenAI's API, which needs one."""
    key = os.environ.get(env, "").strip()
    if key:
        return key
    if urlsplit(base_url).hostname == urlsplit(OPENAI_BASE_URL).hostname:
        raise EndpointError(f"{base_url} needs an API key: set the environment variable {env} "
                            "(or name another variable with --api-key-env).")
    return NO_KEY


class RateLimit:
    """At most ``per_minute`` request starts a minute, evenly spaced (thread-safe); None: none."""

    def __init__(self, per_minute: float | None = None) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Sleep until the next request may start."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)


@dataclass
class OpenAIExplainer:
    """A chat model behind an OpenAI-compatible endpoint: greedy replies and yes/no
    probabilities (``LocalExplainer``'s interface)."""

    client: Any  # openai.OpenAI
    model: str
    base_url: str
    api_key_env: str = DEFAULT_KEY_ENV
    parallel_requests: int = 4
    rate: RateLimit = field(default_factory=RateLimit)
    seed: int = 0

    @property
    def model_id(self) -> str:
        """What explanations are stored under: the model name at the endpoint."""
        return f"{self.model}@{self.base_url}"

    def generate(self, chats: list[Chat], max_new_tokens: int = 24) -> list[str]:
        """The assistant's reply to each chat (at most ``max_new_tokens`` tokens)."""
        replies = self._map(lambda chat: self.complete(chat, max_tokens=max_new_tokens), chats)
        return [(r.choices[0].message.content or "") if r.choices else "" for r in replies]

    def yes_probability(self, chats: list[Chat]) -> Tensor:
        """``[n]`` P(yes) / (P(yes) + P(no)) of the assistant's first token for each chat."""
        replies = self._map(lambda chat: self.complete(chat, max_tokens=1, logprobs=True,
                                                       top_logprobs=TOP_LOGPROBS), chats)
        return torch.tensor([yes_share(r, self.where) for r in replies], dtype=torch.float32)

    def check(self) -> None:
        """One tiny request, so that a wrong URL, key or model name fails before any work."""
        self.complete([{"role": "user", "content": "Answer yes or no: is water wet?"}],
                      max_tokens=1)

    @property
    def where(self) -> str:
        return f"{self.base_url} (model {self.model!r})"

    def complete(self, chat: Chat, **options: Any):
        """The endpoint's chat completion of ``chat`` (greedy), or ``EndpointError``."""
        openai = import_openai()
        self.rate.wait()
        try:
            return self.client.chat.completions.create(model=self.model, messages=chat,
                                                       temperature=0, seed=self.seed, **options)
        except openai.APIError as err:
            raise endpoint_error(err, self) from None

    def _map(self, ask: Callable[[Chat], Any], chats: list[Chat]) -> list:
        """``ask`` of each chat, in order, up to ``parallel_requests`` at once."""
        if self.parallel_requests == 1 or len(chats) <= 1:
            return [ask(chat) for chat in chats]
        with ThreadPoolExecutor(min(self.parallel_requests, len(chats))) as pool:
            return list(pool.map(ask, chats))


def yes_share(response: Any, where: str = "the endpoint") -> float:
    """P(yes) / (P(yes) + P(no)) from the first token's ``top_logprobs`` of a chat completion
    (the sampled token's own log-probability if the server lists no alternatives); 0.5 when no
    yes or no spelling is among them."""
    choice = response.choices[0] if response.choices else None
    content = choice.logprobs.content if choice is not None and choice.logprobs else None
    if not content:
        raise EndpointError(
            f"{where} returned no log-probabilities: the yes/no judge reads P(yes) from the "
            "chat completion's logprobs/top_logprobs. Use a server and model that return them "
            "(OpenAI's gpt-4o/gpt-4.1 models, vLLM, llama.cpp server), or --score none to "
            "explain without scoring.")
    first = content[0]
    yes = no = 0.0
    for top in first.top_logprobs or [first]:
        word = top.token.strip()
        if word in YES:
            yes += math.exp(top.logprob)
        elif word in NO:
            no += math.exp(top.logprob)
    return yes / (yes + no) if yes + no > 0 else 0.5


def endpoint_error(err: Exception, explainer: OpenAIExplainer) -> EndpointError:
    """A one-line ``EndpointError`` for an ``openai.APIError``, saying what to do."""
    openai = import_openai()
    where, tries = explainer.where, explainer.client.max_retries + 1
    detail = str(getattr(err, "message", err))[:300]
    if isinstance(err, openai.APITimeoutError):
        return EndpointError(f"{where} did not answer within {explainer.client.timeout} s, "
                             f"{tries} tries: raise --request-timeout or check the server.")
    if isinstance(err, openai.APIConnectionError):
        return EndpointError(f"Could not reach {where} after {tries} tries ({detail}): start "
                             "the server or fix --base-url (it usually ends in /v1).")
    if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
        state = "is not set" if explainer.client.api_key == NO_KEY else "holds a key it refused"
        return EndpointError(f"{where} refused the request ({err.status_code}: {detail}); the "
                             f"environment variable {explainer.api_key_env} {state}: set it to "
                             "an API key the server accepts (or name another variable with "
                             "--api-key-env).")
    if isinstance(err, openai.NotFoundError):
        return EndpointError(f"{where}: not found ({detail}): check --model and that "
                             "--base-url is the API root (usually ending in /v1).")
    if isinstance(err, openai.RateLimitError):
        return EndpointError(f"{where} refused for rate limits, {tries} tries ({detail}): "
                             "lower --requests-per-minute or --parallel-requests.")
    status = getattr(err, "status_code", None)
    return EndpointError(f"{where} answered {status or 'with an error'}: {detail}")


def check_endpoint_options(config: Any) -> None:
    """``ConfigError`` unless ``--model``/``--base-url`` go with ``--explainer openai`` (which
    needs ``--model``) and the URL is http(s)."""
    if config.explainer != OPENAI_EXPLAINER:
        if config.model is not None or config.base_url is not None:
            raise ConfigError("--model and --base-url go with --explainer openai.")
        return
    if not (config.model or "").strip():
        raise ConfigError("--explainer openai needs --model NAME (the model the endpoint "
                          "serves, e.g. gpt-4o-mini).")
    if config.base_url is not None and urlsplit(config.base_url).scheme not in ("http", "https"):
        raise ConfigError(f"--base-url must be an http(s) URL such as "
                          f"http://127.0.0.1:8000/v1, got {config.base_url!r}.")
    if not config.api_key_env.strip():
        raise ConfigError("--api-key-env is empty: give the name of an environment variable.")


def endpoint_options(config: Any) -> dict:
    """``load_openai_explainer``'s options among ``config``'s fields ({} for other
    explainers)."""
    if config.explainer != OPENAI_EXPLAINER:
        return {}
    return {name: getattr(config, name) for name in ENDPOINT_FIELDS}


def load_openai_explainer(model: str, base_url: str | None = None,
                          api_key_env: str = DEFAULT_KEY_ENV, request_timeout: float = 60.0,
                          max_retries: int = 2, requests_per_minute: float | None = None,
                          parallel_requests: int = 4, check: bool = True) -> OpenAIExplainer:
    """An explainer/judge at ``base_url`` (default OpenAI's API) serving ``model``, the key
    from ``$api_key_env``; with ``check``, one tiny request first, so that a wrong URL, key
    or model fails at once (after at most ``max_retries`` retries of ``request_timeout`` s)."""
    openai = import_openai()
    base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
    client = openai.OpenAI(base_url=base_url, api_key=api_key(base_url, api_key_env),
                           timeout=request_timeout, max_retries=max_retries)
    explainer = OpenAIExplainer(client, model, base_url, api_key_env, parallel_requests,
                                RateLimit(requests_per_minute))
    if check:
        explainer.check()
    return explainer
