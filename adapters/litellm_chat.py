"""`LiteLLMChat`: every other provider (Bedrock, Vertex, Mistral, Cohere, Ollama, ...)
through ``litellm.acompletion``, under the engine's limiter, retries and budget.

LiteLLM's own retries are off (``num_retries=0``, ``max_retries=0``): the engine's
retry policy and limiter must see every attempt.  Its exceptions are mapped onto the
engine's error tree (statuses as `OpenAIChat` maps them; an exhausted quota or spend
limit is `QuotaExceededError`), the usage and the rate-limit headers it passes on are
read back, and so is its cost estimate (`LiteLLMChat.cost`, US dollars so far).

``litellm`` is imported on the first call, never by ``import adapters``: install the
extra (``pip install 'textgrad-engine[litellm]'``).  Its remote price-map fetch at
import is turned off (``LITELLM_LOCAL_MODEL_COST_MAP``) unless set otherwise.

Usage::

    bedrock = LiteLLMChat(model="bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
                          limits=Limits(rpm=500))
    local = LiteLLMChat(model="openai/demo", api_base="http://127.0.0.1:8000/v1")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from engine import (
    AuthenticationError,
    CallTimeoutError,
    Completion,
    ConfigError,
    ConnectionFailedError,
    Limits,
    NoContentError,
    ProviderError,
    QuotaExceededError,
    TransientError,
    Usage,
)

from ._chat_base import ChatAdapter
from ._wire import parse_rate_limits, scrub, translate_status

__all__ = ["LiteLLMChat", "load_litellm", "translate_litellm_error"]

# Words of the providers' "out of money" answers, which LiteLLM reports as rate limits.
_QUOTA_WORDS = (
    "insufficient_quota",
    "exceeded your current quota",
    "enforced_spend_limit_reached",
    "PerDay",
)
# LiteLLM reports a missing key as a 500 (InternalServerError): fatal, not transient.
_NO_KEY_WORDS = ("Missing credentials", "api_key client option must be set")


def load_litellm() -> Any:
    """The ``litellm`` module, imported quietly; `ConfigError` when not installed."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    try:
        with warnings.catch_warnings():  # pydantic's notices about litellm's own types
            warnings.filterwarnings("ignore", message=".*ReadOnly.*", category=UserWarning)
            import litellm
    except ImportError as exc:
        raise ConfigError(
            "LiteLLMChat needs litellm: pip install 'textgrad-engine[litellm]'"
        ) from exc
    litellm.suppress_debug_info = True  # no "Give Feedback" banner on stdout per error
    return litellm


def _headers(exc: BaseException) -> Mapping[str, str]:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    return {str(k).lower(): str(v) for k, v in dict(headers or {}).items()}


def translate_litellm_error(
    exc: BaseException, *, endpoint: str, secrets: Sequence[str] = ()
) -> ProviderError:
    """The engine error for an exception LiteLLM raised."""
    message = scrub(str(getattr(exc, "message", None) or exc), secrets)
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if any(word in message for word in _NO_KEY_WORDS):
        return AuthenticationError(
            f"no credentials reached the provider: {message}", endpoint=endpoint, status=status
        )
    if name == "Timeout":
        return CallTimeoutError(f"the request timed out: {message}", endpoint=endpoint)
    if name == "APIConnectionError":
        return ConnectionFailedError(f"connection failed: {message}", endpoint=endpoint)
    if isinstance(status, int) and status >= 400:
        if status == 429 and any(word in message for word in _QUOTA_WORDS):
            return QuotaExceededError(
                f"the account is out of quota: {message}", endpoint=endpoint, status=status
            )
        body = message.encode()  # translate_status quotes it when it is no JSON error
        return translate_status(status, _headers(exc), body, endpoint=endpoint, secrets=secrets)
    return TransientError(f"{name}: {message}", endpoint=endpoint)


class LiteLLMChat(ChatAdapter):
    """A model behind LiteLLM; implements `engine.ChatModel`.

    Parameters:
        model: LiteLLM's model string (``"bedrock/..."``, ``"mistral/..."``); the
            prompt's ``model`` parameter is ignored in its favour unless ``model`` is
            ``None``.
        api_base, api_key: passed to LiteLLM (else it reads its own environment).
        limits: the endpoint's `Limits`.
        timeout: seconds for one request.
        name: label for events and errors; default ``litellm:<model>``.
        options: further keyword arguments for every ``acompletion`` call.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        timeout: float = 120.0,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._keep_arguments(
            model=model,
            api_base=api_base,
            api_key=api_key,
            limits=limits,
            timeout=timeout,
            name=name,
            options=options,
        )
        secrets = tuple(sorted({api_key} if api_key and len(api_key) >= 8 else set()))
        base = (api_base or "").split("?", 1)[0].rstrip("/")
        self._take_identity(
            f"litellm:{model or ''}@{base}",
            secrets,
            name=name or f"litellm:{model or 'prompt-model'}",
            limits=limits,
        )
        self.model = model
        self.cost = 0.0  # US dollars by LiteLLM's own price map, so far

    async def aclose(self) -> None:
        """Nothing to close: LiteLLM keeps its own clients."""

    def _call_arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        a = self._arguments
        call = {**(a["options"] or {}), **params}
        if a["model"] is not None:
            call["model"] = a["model"]
        for key in ("api_base", "api_key"):
            if a[key] is not None:
                call[key] = a[key]
        call.update(timeout=a["timeout"], num_retries=0, max_retries=0)
        return call

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        litellm = load_litellm()
        try:
            response = await litellm.acompletion(
                messages=[dict(m) for m in messages], **self._call_arguments(params)
            )
        except Exception as exc:  # LiteLLM's tree, the SDKs' under it: all mapped here
            raise translate_litellm_error(exc, endpoint=self.name, secrets=self._secrets) from exc
        return self._completion(response)

    def _completion(self, response: Any) -> Completion:
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost")
        if isinstance(cost, int | float):
            self.cost += float(cost)
        try:
            choice = response.choices[0]
            text = choice.message.content
            usage = response.usage
            tokens = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise TransientError(
                f"malformed response ({type(exc).__name__})", endpoint=self.name
            ) from exc
        reason = str(choice.finish_reason) if choice.finish_reason is not None else None
        if not isinstance(text, str) or (text == "" and reason == "content_filter"):
            raise NoContentError(
                f"the answer has no text (finish_reason {reason})",
                finish_reason=reason,
                endpoint=self.name,
            )
        headers = hidden.get("additional_headers") or {}
        return Completion(
            text=text,
            usage=tokens,
            model=str(response.model) if getattr(response, "model", None) else None,
            finish_reason=reason,
            rate_limits=parse_rate_limits(headers) if isinstance(headers, Mapping) else None,
        )

    def __repr__(self) -> str:
        return f"<LiteLLMChat {self.name!r}>"
