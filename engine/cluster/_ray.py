"""Ray, imported only when a cluster is asked for.

``import engine`` and ``import engine.cluster`` never import Ray (a test checks
``sys.modules``); `ray_module` does, the first time a `RayCluster` starts.  Ray is
loaded through ``importlib`` so that the engine's type checking does not follow Ray's
sources: every Ray object is ``Any`` here, and translated into the engine's own types
and errors at this boundary.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._errors import ConfigError, EngineError

__all__ = ["ActorDied", "ray_data_module", "ray_module", "unwrap_task_error"]

_INSTALL = "pip install 'textgrad-engine[cluster]'"


def ray_module() -> Any:
    """The ``ray`` package, or a `ConfigError` saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(f"a cluster needs Ray, which is not installed: {_INSTALL}") from exc


def ray_data_module() -> Any:
    """``ray.data`` (part of the ``ray[data]`` extra)."""
    try:
        return importlib.import_module("ray.data")
    except ImportError as exc:
        raise ConfigError(f"reading files on a cluster needs Ray Data: {_INSTALL}") from exc


class ActorDied(EngineError):
    """A worker process ended (killed, crashed, its node lost) while running a batch."""


def unwrap_task_error(exc: BaseException) -> BaseException:
    """The error to raise at the driver for a failed remote call.

    A worker that died becomes `ActorDied` (its batches are run again elsewhere); an
    engine error raised inside a worker is re-raised as itself, so callers catch the
    same classes as in a local run; anything else is wrapped in an `EngineError` that
    keeps Ray's message.
    """
    ray = ray_module()
    exceptions = ray.exceptions
    if isinstance(exc, exceptions.RayActorError | exceptions.WorkerCrashedError):
        return ActorDied(f"a cluster worker died: {exc}")
    if isinstance(exc, exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, EngineError):
            return cause
        return EngineError(f"a cluster worker failed: {type(cause).__name__}: {cause}")
    return exc
