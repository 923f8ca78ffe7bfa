"""The OpenAI-compatible judge (OpenAI, vLLM, Ollama, llama.cpp's server): bounded retries, and a circuit breaker
that stops the run when the endpoint is down instead of leaving every item unscored."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
KEY_ENV = ("FEATBENCH_JUDGE_API_KEY", "OPENAI_API_KEY")  # the only places an API key is read from
JUDGE_HINT = "pip install 'featbench[judge]'"
URL_EXAMPLE = "http://127.0.0.1:8000/v1"
# Transport settings read from the environment by `OpenAIJudge.from_env`: variable -> (constructor argument,
# default). They do not change answers, so they are not part of the cache key.
ENV_SETTINGS = {
    "FEATBENCH_JUDGE_CONCURRENCY": ("concurrency", 8),  # prompts in flight at once
    "FEATBENCH_JUDGE_RETRIES": ("max_retries", 3),  # retries per prompt after the first attempt
    "FEATBENCH_JUDGE_TIMEOUT": ("timeout", 30.0),  # seconds per HTTP request
    "FEATBENCH_JUDGE_BACKOFF": ("backoff", 1.0),  # first retry delay in seconds, doubled per retry
    "FEATBENCH_JUDGE_MAX_FAILURES": ("max_failures", 5),  # prompts in a row without an answer that stop the run
}


class JudgeUnavailable(ValueError):
    """The judge endpoint stopped answering: `max_failures` prompts in a row ran out of retries (or the
    preflight probe got no answer). A ValueError, so the CLI prints its one line and exits 2; records written so
    far are kept and `bench run --resume DIR` continues once the endpoint answers."""


def check_base_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host, else a ValueError naming it and an example."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--judge-base-url {url!r} is not an http(s) URL with a host; e.g. {URL_EXAMPLE}")
    return url


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not a number") from None


class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint via the `openai` client.

    The key is read from $FEATBENCH_JUDGE_API_KEY or $OPENAI_API_KEY only, and never logged or stored.
    Prompts run in a thread pool of `concurrency`, each HTTP request bounded by the client's `timeout`; 429, 5xx,
    timeouts and connection errors are retried up to `max_retries` times with exponential backoff and seeded
    jitter (the client's own retries are off, so the jitter is reproducible and `requests` counts every try).
    A prompt that runs out of retries is None (unscored); `max_failures` such prompts in a row (in completion
    order, across calls) mean the endpoint is down: the in-flight prompts stop and `JudgeUnavailable` is raised.
    Any reply (even a malformed one or a non-retryable 4xx, both None for that prompt) resets the count.
    401/403/404 stop the run at once: every call would fail. With the defaults an endpoint that always answers
    500 stops a run after about 7 s of backoff (1 + 2 + 4 s, jittered x0.5-1.5); one that hangs after about
    (1 + max_retries) x timeout + backoff = 2 minutes."""

    def __init__(self, model: str, base_url: str | None = None, *, concurrency: int = 8, max_retries: int = 3,
                 timeout: float = 30.0, backoff: float = 1.0, max_backoff: float = 30.0, max_failures: int = 5,
                 temperature: float = 0.0, max_tokens: int = 128, seed: int = 0) -> None:
        if base_url is not None:
            check_base_url(base_url)
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or max_failures < 1 or backoff < 0:
            raise ValueError(f"bad openai judge settings concurrency={concurrency}, max_retries={max_retries}, "
                             f"timeout={timeout}, backoff={backoff}, max_failures={max_failures}; need "
                             "concurrency >= 1, max_retries >= 0, timeout > 0, backoff >= 0, max_failures >= 1")
        try:
            import openai
        except ImportError as e:
            raise ModuleNotFoundError(f"the openai judge needs the openai client: {JUDGE_HINT}") from e
        key = next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), None)
        if key is None:
            if base_url is None:
                raise ValueError(f"--judge openai:{model} needs an API key in ${KEY_ENV[0]} or ${KEY_ENV[1]} "
                                 "(or --judge-base-url for a local server that needs none)")
            key = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) accept any key
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self.model, self.base_url = model, base_url
        self.name = f"openai:{model}"
        self.params = {"temperature": temperature, "max_tokens": max_tokens, "base_url": base_url}
        self.concurrency, self.max_retries, self.max_failures = concurrency, max_retries, max_failures
        self.backoff, self.max_backoff, self.timeout = backoff, max_backoff, timeout
        self.calls = 0  # prompts completed through the endpoint (one per prompt, retries not counted)
        self.requests = 0  # HTTP requests made, retries included
        self.failures = 0  # prompts in a row that ran out of retries
        self.last_error: str | None = None  # why the last prompt without an answer failed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._down = threading.Event()  # set when `max_failures` is reached; wakes sleeping retries

    @classmethod
    def from_env(cls, model: str, base_url: str | None = None) -> OpenAIJudge:
        """A judge with the transport settings of `ENV_SETTINGS` (environment, else the defaults)."""
        kwargs: dict[str, Any] = {}
        for var, (arg, default) in ENV_SETTINGS.items():
            value = _env_number(var, default)
            if isinstance(default, int) and value != int(value):
                raise ValueError(f"${var}={os.environ[var]!r} is not a whole number")
            kwargs[arg] = int(value) if isinstance(default, int) else value
        return cls(model, base_url, **kwargs)

    @property
    def endpoint(self) -> str:
        return self.base_url or str(self._client.base_url)

    def complete(self, prompts: list[str]) -> list[str | None]:
        out: list[str | None] = [None] * len(prompts)
        for i, answer in self.stream(prompts):
            out[i] = answer
        return out

    def stream(self, prompts: list[str]) -> Iterator[tuple[int, str | None]]:
        """(index, answer) pairs in completion order, each yielded the moment its call returns (the cache stores
        it then). Raises `JudgeUnavailable` after `max_failures` prompts in a row got no answer."""
        with self._lock:
            self.calls += len(prompts)
            if self._down.is_set():  # a new call after an outage gets a fresh chance
                self._down.clear()
                self.failures = 0
        if not prompts:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)))
        try:
            futures = {pool.submit(self._one, p): i for i, p in enumerate(prompts)}
            with tqdm(total=len(prompts), desc=self.name, leave=False, disable=len(prompts) < 16) as bar:
                for future in as_completed(futures):
                    answer = future.result()
                    bar.update(1)
                    yield futures[future], answer
                    if self._down.is_set():
                        raise JudgeUnavailable(self.outage())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a hung request ends by its own timeout

    def outage(self) -> str:
        """The one-line message of `JudgeUnavailable`."""
        return (f"judge endpoint {self.endpoint} is unavailable: {self.failures} prompts in a row got no answer "
                f"(last: {self.last_error}); records so far are kept, continue with `bench run --resume <run dir>` "
                "once it answers (the limit is $FEATBENCH_JUDGE_MAX_FAILURES)")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        with self._lock:
            jitter = 0.5 + self._rng.random()
        delay = min(self.max_backoff, self.backoff * 2**attempt) * jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def _answered(self) -> None:
        with self._lock:
            self.failures = 0

    def _failed(self, why: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = why
            if self.failures >= self.max_failures:
                self._down.set()

    def _one(self, prompt: str) -> str | None:
        oa = self._openai
        why = "not tried"
        for attempt in range(self.max_retries + 1):
            if self._down.is_set():
                return None
            with self._lock:
                self.requests += 1
            retry_after = None
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    temperature=self.params["temperature"], max_tokens=self.params["max_tokens"])
            except oa.APITimeoutError:
                why = f"timeout of {self.timeout:g} s"
            except oa.APIConnectionError:
                why = "connection error"
            except oa.APIStatusError as e:
                code = e.status_code
                if code in (401, 403, 404):
                    raise ValueError(f"judge endpoint refused the request with HTTP {code} for model "
                                     f"{self.model!r}; check the model name, --judge-base-url and the key "
                                     f"variable (${KEY_ENV[0]} or ${KEY_ENV[1]})") from None
                if code != 429 and code < 500:
                    log.warning("judge: HTTP %d for one prompt; left unscored", code)
                    self._answered()
                    return None
                why = f"HTTP {code}"
                retry_after = _retry_after(e)
            except (ValueError, oa.APIResponseValidationError) as e:  # json.JSONDecodeError is a ValueError
                log.warning("judge: malformed reply (%s); left unscored", type(e).__name__)
                self._answered()
                return None
            else:
                self._answered()
                try:
                    text = reply.choices[0].message.content
                except (AttributeError, IndexError, TypeError, KeyError):
                    text = None
                if not isinstance(text, str):
                    log.warning("judge: reply without message content; left unscored")
                    return None
                return text
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.debug("judge: %s, retry %d/%d in %.2fs", why, attempt + 1, self.max_retries, delay)
                if self._down.wait(delay):  # the endpoint was declared down meanwhile: stop retrying
                    return None
        log.warning("judge: gave up after %d attempts (%s); left unscored", self.max_retries + 1, why)
        n = self.max_retries + 1
        self._failed(f"{why} after {n} attempt{'s' if n > 1 else ''}")
        return None


def _retry_after(error: Any) -> float | None:
    try:
        return float(error.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
