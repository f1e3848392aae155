"""A client of OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp, Ollama, hosted APIs),
with the standard library only.

`ChatClient.complete(messages)` posts to `<url>/chat/completions` (the URL may also name that path
itself) and returns the reply's text, read whole or as a server-sent-event stream (`stream=True`).
Rate limits (429), server errors (5xx), dropped connections and timeouts are retried with
exponential backoff (`backoff` × 2^attempt seconds, or the server's `Retry-After`); other HTTP errors
and replies that are not chat completions fail at once. Every failure is a `ChatError`, a
`UserInputError`, so the command line reports it on one line.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sae_circuits.errors import UserInputError

Message = dict[str, str]

RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


class ChatError(UserInputError):
    """A chat-completions request that failed (after its retries, where it was retried)."""


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


@dataclass
class ChatClient:
    """Chat completions from `model` at `url`; `api_key` (optional for local servers) is sent as a
    bearer token. `sleep` is injectable so tests need not wait for the backoff."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    stream: bool = False
    temperature: float = 0.0
    max_tokens: int = 1024
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def from_environment(
        cls, url: str, model: str, key_variable: str = "OPENAI_API_KEY", **options: Any
    ) -> ChatClient:
        """A client whose key is read from the environment variable `key_variable` (if set)."""
        if not url.startswith(("http://", "https://")):
            raise UserInputError(f"--llm-url must be an http(s) URL, got {url!r}")
        return cls(url, model, os.environ.get(key_variable) or None, **options)

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else f"{base}/chat/completions"

    def complete(self, messages: Sequence[Message]) -> str:
        """The text of the model's reply to `messages`."""
        body = {
            "model": self.model,
            "messages": list(messages),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            try:
                return self._post(data)
            except _Retry as retry:
                if attempt == self.retries:
                    raise ChatError(
                        f"{self.endpoint}: {retry} (gave up after {attempt + 1} attempts)"
                    ) from None
                self.sleep(retry.wait if retry.wait is not None else self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.stream:
            headers["Accept"] = "text/event-stream"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if self.stream:
                    return _read_stream(response, self.endpoint)
                return _read_whole(response.read(), self.endpoint)
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code in RETRIED_STATUS:
                raise _Retry(f"HTTP {error.code} {detail}", _retry_after(error)) from None
            raise ChatError(f"{self.endpoint}: HTTP {error.code} {detail}") from None
        except urllib.error.URLError as error:
            raise _Retry(f"cannot connect: {error.reason}") from None
        except TimeoutError:
            raise _Retry(f"no reply within {self.timeout:g} s") from None
        except (http.client.HTTPException, ConnectionError) as error:
            raise _Retry(f"connection failed: {type(error).__name__} {error}") from None


def _read_whole(raw: bytes, endpoint: str) -> str:
    try:
        reply = json.loads(raw)
        content = reply["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ChatError(f"{endpoint}: not a chat completion: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise ChatError(f"{endpoint}: the reply has no text content")
    return content


def _read_stream(lines: Iterable[bytes], endpoint: str) -> str:
    """The concatenated `delta.content` of a server-sent-event stream, up to `data: [DONE]`."""
    parts = []
    for raw in lines:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (":"), event names
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise ChatError(f"{endpoint}: bad event in the stream: {payload[:200]!r}") from None
        if "error" in chunk:
            raise ChatError(f"{endpoint}: error in the stream: {chunk['error']}")
        for choice in chunk.get("choices", []):
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()[:500].decode("utf-8", "replace")
    except OSError:
        return str(error.reason)
    try:
        message = json.loads(body)["error"]
        return str(message.get("message", message) if isinstance(message, dict) else message)
    except (json.JSONDecodeError, KeyError, TypeError):
        return body.strip() or str(error.reason)


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
