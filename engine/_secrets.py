"""Which field names hold secrets: the one rule shared by run files and redaction.

A name is split into words (``apiKey`` -> ``api key``, ``x-api-key`` -> ``x api key``)
and is secret when one of its words is a credential word (``key``, ``token``, ``secret``,
``password``, ``authorization``...) or ends like one written as a single word
(``openaiapikey``, ``accesstoken``, ``clientsecret``).  A name whose last word is
``env``, ``file`` or ``path`` is not secret: its value says *where* a secret lives
(``api_key_env = "OPENAI_API_KEY"``), which is what a run file should hold.
Counts are not secrets either: ``max_tokens`` has the word ``tokens``, not ``token``.

Run files refuse secret names (`engine.cli._runfile`); events and errors redact their
values (`engine._redact`).  Change the rule here and both follow.
"""

from __future__ import annotations

import re

__all__ = ["SECRET_WORDS", "is_secret_name"]

SECRET_WORDS = frozenset(
    {
        "apikey",
        "authorization",
        "credential",
        "credentials",
        "key",
        "passphrase",
        "passwd",
        "password",
        "passwords",
        "secret",
        "secrets",
        "token",
    }
)
# Single-word spellings that end like a credential: ``accesstoken``, ``clientsecret``.
_SECRET_ENDINGS = ("apikey", "accesskey", "privatekey", "secretkey", "token", "secret", "password")
# A last word that makes the name a reference to a secret, not the secret itself.
_REFERENCE_WORDS = frozenset({"env", "file", "path"})

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _words(name: str) -> list[str]:
    return [w for w in _SEPARATORS.split(_CAMEL.sub(r"\1_\2", name).lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a credential (see the module docstring)."""
    words = _words(name)
    if not words or words[-1] in _REFERENCE_WORDS:
        return False
    return any(w in SECRET_WORDS or w.endswith(_SECRET_ENDINGS) for w in words)
