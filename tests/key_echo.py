"""A test adapter behind a gateway that echoes the caller's key in its error bodies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine import BadRequestError, Completion


class KeyEchoModel:
    """Rejects every call with an error text that contains the key it was given."""

    def __init__(self, *, api_key: str) -> None:
        self._key = api_key

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        raise BadRequestError(f"invalid key {self._key} for this deployment", status=400)
