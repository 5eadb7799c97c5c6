"""Implementations of the engine's protocols: providers, simulated providers, the demo.

``adapters`` imports ``engine``; ``engine`` never imports ``adapters`` (a test enforces
it).  Run files name adapters as ``"module:Class"`` strings resolved at run time.

The provider adapters are imported on first use, so ``import adapters`` (for the demo
task or the scripted model) never imports an HTTP stack or the OpenAI SDK::

    from adapters import OpenAIChat          # imports adapters.openai_chat now
"""

from typing import TYPE_CHECKING, Any

from engine.testing import ScriptedModel, ScriptedRequest, transient_faults

from .scripted import ArithmeticCoach, ArithmeticModel, arithmetic_examples

if TYPE_CHECKING:
    from .anthropic import AnthropicChat
    from .anthropic_batch import AnthropicBatch
    from .gemini import GeminiChat
    from .litellm_chat import LiteLLMChat
    from .openai_batch import OpenAIBatch
    from .openai_chat import OpenAIChat
    from .simulated_server import ServerConfig, SimulatedServer

__all__ = [
    "AnthropicBatch",
    "AnthropicChat",
    "ArithmeticCoach",
    "ArithmeticModel",
    "GeminiChat",
    "LiteLLMChat",
    "OpenAIBatch",
    "OpenAIChat",
    "ScriptedModel",
    "ScriptedRequest",
    "ServerConfig",
    "SimulatedServer",
    "arithmetic_examples",
    "transient_faults",
]

_LAZY = {
    "AnthropicBatch": "anthropic_batch",
    "AnthropicChat": "anthropic",
    "GeminiChat": "gemini",
    "LiteLLMChat": "litellm_chat",
    "OpenAIChat": "openai_chat",
    "OpenAIBatch": "openai_batch",
    "ServerConfig": "simulated_server",
    "SimulatedServer": "simulated_server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
