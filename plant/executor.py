"""Where the heavy offline work runs: a local process pool (the default) or a Dask cluster.

``data.executor = "local"`` uses ``data.workers`` processes on this machine; ``data.executor =
"tcp://HOST:PORT"`` sends each task to a running Dask scheduler (``dask scheduler`` and ``dask worker``
processes, on this machine or others that can import this project). Either way the tasks are pure functions
whose results come back here, so what is written to disk does not depend on where they ran.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any


def is_cluster(executor: str) -> bool:
    return executor.startswith("tcp://")


def executor_arg(value: str) -> str:
    """An ``--executor`` on a command line: "local" or a Dask scheduler's address (anything else ran locally)."""
    if value == "local" or (is_cluster(value) and len(value) > len("tcp://")):
        return value
    raise argparse.ArgumentTypeError(f'{value!r}: give "local" or a Dask scheduler address "tcp://HOST:PORT"')


def run_all(fn: Callable[..., Any], items: Sequence[Any], executor: str = "local", workers: int = 1) -> Iterator[Any]:
    """``fn(item)`` for every item, results yielded as they complete (not in order)."""
    if is_cluster(executor):
        from distributed import Client  # imported only when a cluster is named
        from distributed import as_completed as dask_completed

        with Client(executor, timeout=30) as client:
            futures = client.map(fn, list(items), pure=False)
            for future in dask_completed(futures):
                yield future.result()
        return
    if workers <= 1 or len(items) <= 1:
        yield from (fn(item) for item in items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(fn, item) for item in items]):
            yield future.result()
