"""The event loop a peer owns: its background tasks, their owner, and their cancellation.

A peer's network work is mostly waiting: for DHT answers, for peers to join a group, for a
joiner to ask for the state. It all runs as asyncio tasks on one loop, in one thread this
object owns ("swarmtrain-<name>-loop"):

    announcer      keeps the peer's record alive            (membership.Announcer.run)
    rediscovery    re-dials peers and entry points          (membership.Rediscovery.run)
    state server   answers joiners' state requests          (transfer.StateServer.run)
    rounds         matchmaking waits, then the all-reduce   (rounds.RoundLoop, via call/submit)

Blocking C++ calls (gloo collectives, TCPStore connects, serializing a state) run in the
loop's default executor, so the loop itself never stalls on them.

Lifecycle: `start()`; `spawn()` a long-lived task, `submit()`/`call()` a coroutine from
another thread; `close()` cancels every task still running, waits for them (bounded), and
stops the thread. A task that raises is logged with its name; it never dies silently.
A blocking call already running in the executor cannot be interrupted: `close()` waits
for it up to `timeout` (each such call has its own network timeout), then leaves it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
from typing import Any, Coroutine, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class PeerLoop:
    """One asyncio event loop in one thread, owned by a Peer (or a bootstrap node)."""

    def __init__(self, name: str = "peer") -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        # Where blocking calls go (gloo, TCPStore connects, serializing a state), named for ps/py-spy.
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(thread_name_prefix=f"swarmtrain-{name}-io"))
        self._thread = threading.Thread(target=self._run, name=f"swarmtrain-{name}-loop", daemon=True)
        # Running work -> (its name for logs, whether it is a background task nobody waits on).
        self._tasks: dict[concurrent.futures.Future, tuple[str, bool]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PeerLoop":
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_loop(self) -> bool:
        """Whether the caller runs on this loop's thread (where `call` would deadlock)."""
        return threading.current_thread() is self._thread

    def close(self, timeout: float = 15.0) -> None:
        """Cancel every task, wait for them up to `timeout`, stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._thread.is_alive():
            self._loop.close()
            return

        async def _finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=timeout)
                for t in stuck:
                    log.warning("%s of %s did not stop within %.0fs; leaving it", t.get_name(), self.name, timeout)
            # Blocking calls already in the executor (a gloo collective, a TCPStore connect) end
            # within their own network timeouts; wait for them, within our bound.
            try:
                await asyncio.wait_for(self._loop.shutdown_default_executor(), timeout)
            except asyncio.TimeoutError:
                log.warning("a blocking network call of %s is still running; leaving it", self.name)

        try:
            asyncio.run_coroutine_threadsafe(_finish(), self._loop).result(2 * timeout + 1)
        except (concurrent.futures.TimeoutError, RuntimeError) as e:  # the loop is wedged or gone
            log.warning("the %s loop did not shut down cleanly: %s", self.name, e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=timeout)
        if not self._thread.is_alive():
            self._loop.close()
        # A cancelled task keeps its frames in a reference cycle (task -> CancelledError ->
        # traceback -> task), and those frames hold the peer's parts: a TCPStore closes its
        # listening port only when freed. Free them now, not at some later collection.
        gc.collect()

    # ------------------------------------------------------------------ work
    def submit(self, coro: Coroutine[Any, Any, T], name: str, *, background: bool = False) -> concurrent.futures.Future[T]:
        """Run `coro` as a task on this loop; return a future any thread can wait on or cancel.
        Raises RuntimeError once the loop is closed (the coroutine is then never run)."""
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError(f"the {self.name} loop is closed")
            fut = asyncio.run_coroutine_threadsafe(_named(coro, name), self._loop)
            self._tasks[fut] = (name, background)
        fut.add_done_callback(self._done)
        return fut

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> concurrent.futures.Future:
        """A long-lived background task (an announcer, a server): runs until cancelled."""
        return self.submit(coro, name, background=True)

    def call(self, coro: Coroutine[Any, Any, T], name: str, timeout: float | None = None) -> T:
        """Run `coro` on this loop and wait for its result in the calling thread (never the loop's own)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("PeerLoop.call from the loop's own thread would deadlock; await the coroutine instead")
        fut = self.submit(coro, name)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()  # the caller gave up (KeyboardInterrupt, timeout): so does the task
            raise

    def _done(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            name, background = self._tasks.pop(fut, ("a task", False))
        if fut.cancelled():
            return
        e = fut.exception()
        if background and (e is not None or not self._closed):
            # A submitter sees its coroutine's exception through the future; a background task
            # has nobody waiting on it, so its end (it should run until cancelled) is logged here.
            log.warning("%s of %s stopped: %s", name, self.name, f"{type(e).__name__}: {e}" if e else "returned")


async def _named(coro: Coroutine[Any, Any, T], name: str) -> T:
    task = asyncio.current_task()
    if task is not None:
        task.set_name(name)  # for the log line of a task that will not stop
    return await coro


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; whether it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return event.is_set()
