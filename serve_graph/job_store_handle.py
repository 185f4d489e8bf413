"""The job store as an Ingress replica calls it (`StoreHandle`): its actor handle, found again
by name when the store it pointed to was replaced.

`jobs.job_store` replaces a running store started with other job settings or other code: the
first replica of a new deployment stops it and starts a new one. During a rolling update the
replicas of the deployment before still answer requests, and a plain handle of theirs points
at the stopped store: each of their job calls would fail (a 500) until Serve stopped them.
"""
import asyncio
import time
import typing as tp

import ray

from .jobs import NAME, NAMESPACE

FIND_S = 30.  # how long a call waits for the store that replaced a stopped one to be named


class StoreHandle:
    """Calls `JobStore` methods as an actor handle does (`store.get.remote(...)`, awaited or
    left to run), on the store that holds the name now: a call that finds its store stopped
    (`ActorDiedError`) is sent once more to the one that replaced it."""

    def __init__(self, handle):
        self._handle = handle
        self._calls: tp.Set[asyncio.Task] = set()  # under way (the loop holds tasks weakly)

    def __getattr__(self, method: str) -> "_Method":
        if method.startswith("_"):  # not a store method (copy, pickle, an unset attribute)
            raise AttributeError(method)
        return _Method(self, method)

    def send(self, method: str, args: tuple, kwargs: dict) -> "asyncio.Task":
        """`method(*args, **kwargs)` as a task of this event loop: awaited for its answer, or
        left to run (an update: its failure, as a plain handle's, goes unreported)."""
        task = asyncio.ensure_future(self._call(method, args, kwargs))
        self._calls.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: "asyncio.Task") -> None:
        self._calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a call left to run fails in silence

    async def _call(self, method: str, args: tuple, kwargs: dict) -> tp.Any:
        handle = self._handle
        try:
            return await getattr(handle, method).remote(*args, **kwargs)
        except ray.exceptions.ActorDiedError:
            replacement = await asyncio.to_thread(_replacement_of, handle)
            if replacement is None:
                raise
            self._handle = replacement
            return await getattr(replacement, method).remote(*args, **kwargs)


class _Method:
    def __init__(self, store: StoreHandle, name: str):
        self._store, self._name = store, name

    def remote(self, *args, **kwargs) -> "asyncio.Task":
        return self._store.send(self._name, args, kwargs)


def _replacement_of(handle) -> tp.Optional[tp.Any]:
    """The store named now, once it is another than `handle`'s; None after `FIND_S`."""
    deadline = time.monotonic() + FIND_S
    while time.monotonic() < deadline:
        try:
            named = ray.get_actor(NAME, namespace=NAMESPACE)
        except ValueError:  # between the old one's end and the new one's start
            named = None
        if named is not None and named._actor_id != handle._actor_id:
            return named
        time.sleep(0.2)
    return None
