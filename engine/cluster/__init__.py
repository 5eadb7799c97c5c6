"""Past one machine: the engine's evaluation on a Ray cluster.

Usage (the two-line change from a local run)::

    from engine.cluster import RayCluster

    async with RayCluster("local", workers=4) as cluster:
        result = await evaluate(prompt, data, model=chat, metric=metric, cluster=cluster)
        best = await optimize(prompt, train, ..., cluster=cluster)  # full-set validations

A file too big for the driver goes as a `FileDataset` (Ray Data reads and splits it)::

    await evaluate(prompt, FileDataset("big.jsonl"), ..., cache=Cache(PostgresStore(url)),
                   cluster=cluster)

Nothing here imports Ray until a cluster starts (Ray is the optional extra ``cluster``).
The core is unchanged: workers run the same `engine.evaluate` on their batches; what
the cluster adds is how work, rate limits, racing and the cache are shared.
"""

from ._cluster import RayCluster
from ._source import FileDataset

__all__ = ["FileDataset", "RayCluster"]
