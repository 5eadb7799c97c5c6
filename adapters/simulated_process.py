"""The simulated provider in its own process, as a real provider would be.

`adapters.simulated_server.SimulatedServer` runs in a thread of the caller's process,
which is what tests want (its ``stats`` are live objects).  A benchmark wants the
opposite: the provider's CPU must not compete with the client's event loop for one
GIL.  This starts ``python -m adapters.simulated_server`` on a free port and reads its
counts over HTTP (``GET /_stats``)::

    async with simulated_provider_process(rpm=3000, latency_median=0.05) as root:
        chat = OpenAIChat(base_url=root + "/v1")
        ...
        stats = await fetch_stats(root)
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import anyio

__all__ = ["fetch_stats", "simulated_provider_process"]


@contextlib.asynccontextmanager
async def simulated_provider_process(
    *, start_timeout: float = 10.0, **options: float | str
) -> AsyncIterator[str]:
    """Run the simulated provider in a child process; yields its root URL.

    ``options`` are the server's command-line options with underscores
    (``rpm=3000``, ``latency_median=0.25``, ``retry_after="ms"``).  The child is
    terminated on exit.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [sys.executable, "-m", "adapters.simulated_server", "--port", str(port)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    root = f"http://127.0.0.1:{port}"
    async with await anyio.open_process(args, stderr=subprocess.DEVNULL) as proc:
        try:
            with anyio.fail_after(start_timeout):
                while True:
                    try:
                        await fetch_stats(root)
                        break
                    except OSError:
                        await anyio.sleep(0.05)  # not listening yet
            yield root
        finally:
            proc.terminate()


async def fetch_stats(root: str) -> dict[str, Any]:
    """The provider's own counts (`ServerStats.summary`), fetched in a worker thread."""

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"{root}/_stats", timeout=5) as response:
            return dict(json.loads(response.read()))

    return await anyio.to_thread.run_sync(get)
