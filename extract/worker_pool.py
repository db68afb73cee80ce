"""The extraction actors and the shards in flight on them: requeue on a lost actor, probe for restarts.

Ray's ``ray.wait``/``ray.get`` and the actor probe are injected (as in ``ray.util.actor_pool``), so the
requeue, loss and over-asking rules are unit-tested with fake refs and no Ray cluster
(tests/test_worker_pool.py).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from unipt.extract.ray_session import root_cause
from unipt.pipeline.cache.layout import ShardSpec
from unipt.pipeline.errors import UniptError

NOTICE_EVERY_S = 60.0  # a line while no worker is running, so a stalled extraction never waits silently
REPROBE_S = 1.0  # how often to ask a restarting actor whether it is back
MAX_SHARD_ATTEMPTS = 4  # a shard whose worker dies this often is failing the workers, not unlucky

# ray.wait(refs, num_returns=1, timeout=s) -> (done, not done); ray.get(ref) -> value, or raises.
Wait = Callable[..., tuple[list[Any], list[Any]]]
Get = Callable[[Any], Any]


def _describe(actor: Any) -> Any:
    return actor.describe.remote()


class WorkerPool:
    """Extraction actors and the shards in flight on them; survives losing any but the last actor.

    Ray restarts an actor whose process died (``max_restarts``), but its in-flight tasks are not
    retried by Ray (``max_task_retries=0``): a restarted actor may never be placed again (its node is
    gone and the others are full), and a retry queued on it would wait forever. Instead a failed
    shard goes back to our queue for whichever actor is alive, and the dead one is probed
    (``describe``): answering means it was restarted and takes shards again; ``ActorUnavailableError``
    means it is restarting (asked again shortly), and a restart with nowhere to run never answers;
    ``ActorDiedError`` means it is gone for good. Shards are idempotent (each writes only its own rows,
    then its marker), so a shard redone elsewhere writes exactly the same bytes.

    ``per_actor`` shards are in flight on each ready actor at most. ``on_no_worker_ready`` is called
    every ``NOTICE_EVERY_S`` while no actor has answered yet (to say what the cluster has free).
    """

    def __init__(
        self,
        actors: list[Any],
        per_actor: int,
        *,
        on_no_worker_ready: Callable[[], None] = lambda: None,
        probe: Callable[[Any], Any] = _describe,
        wait: Wait = ray.wait,
        get: Get = ray.get,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.actors = actors
        self.per_actor = per_actor
        self._on_no_worker_ready = on_no_worker_ready
        self._probe_ref, self._wait, self._get, self._clock, self._sleep = probe, wait, get, clock, sleep
        self.ready: set[int] = set()
        self.shards_done: Counter[int] = Counter()  # actor -> shards it finished (the work it did)
        self.lost: set[int] = set()  # dead for good
        self.down: set[int] = set()  # failed and not answering again (yet): the lost, and the unplaceable
        self.in_flight = dict.fromkeys(range(len(actors)), 0)
        self.pending: dict[Any, tuple[int, ShardSpec | None]] = {}  # ref -> (actor, shard or None: a probe)
        self.requeued = 0
        self.reprobe_at: dict[int, float] = {}  # actor -> when to ask a restarting actor again
        for i in range(len(actors)):
            self._probe(i)

    def _probe(self, i: int) -> None:
        self.pending[self._probe_ref(self.actors[i])] = (i, None)

    def _shards_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def first_description(self) -> dict[str, Any]:
        """The backbone's description from the first actor that has loaded it."""
        while True:
            _, shard, value, error = self._next()
            if error is None and shard is None:
                return value

    def run(
        self,
        todo: list[ShardSpec],
        submit: Callable[[Any, ShardSpec], Any],
        on_done: Callable[[dict[str, Any]], None],
    ) -> None:
        """Run every shard in ``todo`` (``submit(actor, shard)`` gives its ObjectRef) to completion;
        ``on_done`` gets each shard's value once, in the order the shards finish."""
        queue = deque(todo)
        attempts: Counter[int] = Counter()
        finished: set[int] = set()
        while queue or self._shards_in_flight():
            for i in sorted(self.ready):
                while queue and self.in_flight[i] < self.per_actor:
                    shard = queue.popleft()
                    self.pending[submit(self.actors[i], shard)] = (i, shard)
                    self.in_flight[i] += 1
            actor, shard, value, error = self._next()
            if shard is None:
                continue
            if error is not None:
                attempts[shard.shard_id] += 1
                if attempts[shard.shard_id] >= MAX_SHARD_ATTEMPTS:
                    raise UniptError(
                        f"shard {shard.shard_id} lost its worker {attempts[shard.shard_id]} times "
                        f"(last: {root_cause(error)}); it may be too large for a worker's memory: lower "
                        "extract.shard_size or backbone.batch_size and run the same command again"
                    )
                queue.appendleft(shard)
                self.requeued += 1
            elif shard.shard_id not in finished:  # a shard redone after a lost reply counts once
                finished.add(shard.shard_id)
                self.shards_done[actor] += 1  # the actor that ran it (was `i`, the last actor filled)
                on_done(value)

    def _next(self) -> tuple[int, ShardSpec | None, Any, RayActorError | None]:
        """Wait for the next probe or shard to finish: (actor, shard or None for a probe, value, the
        actor error if the actor failed). Other errors (the worker's own exceptions) are raised."""
        while True:
            now = self._clock()
            for i, at in list(self.reprobe_at.items()):
                if at <= now:
                    del self.reprobe_at[i]
                    self._probe(i)
            if len(self.lost) == len(self.actors) or not (self.pending or self.reprobe_at):
                raise UniptError(
                    f"all {len(self.actors)} extraction workers were lost; finished shards are kept and "
                    "the same command resumes from them once the cluster has room again"
                )
            wait_s = min([NOTICE_EVERY_S, *(at - now for at in self.reprobe_at.values())])
            if not self.pending:  # only restarting actors, each to be asked again shortly
                self._sleep(max(wait_s, 0.0))
                continue
            done, _ = self._wait(list(self.pending), num_returns=1, timeout=max(wait_s, 0.0))
            if not done:
                if self.reprobe_at and wait_s < NOTICE_EVERY_S:
                    continue
                if not self.ready:
                    self._on_no_worker_ready()
                continue
            ref = done[0]
            i, shard = self.pending.pop(ref)
            if shard is not None:
                self.in_flight[i] -= 1
            try:
                value = self._get(ref)
            except RayActorError as exc:
                if exc.actor_init_failed and not self.ready:
                    raise  # the backbone cannot load: every other actor will fail the same way
                self._on_actor_error(i, shard, exc)
                if shard is None:
                    continue
                return i, shard, None, exc
            if shard is None:
                self.ready.add(i)
                self.down.discard(i)  # restarted: takes shards again
            return i, shard, value, None

    def _on_actor_error(self, i: int, shard: ShardSpec | None, exc: RayActorError) -> None:
        if i in self.lost:
            return
        self.down.add(i)
        self.ready.discard(i)  # no more shards until it answers a probe again
        if shard is None and isinstance(exc, ActorDiedError):
            # Ray says "died" only once it will not restart the actor (restarts spent, backbone no longer
            # loads); while restarting it says "unavailable".
            self.lost.add(i)
        elif shard is None:
            self.reprobe_at[i] = self._clock() + REPROBE_S
        elif i not in self.reprobe_at and not any(j == i and s is None for j, s in self.pending.values()):
            self._probe(i)

    @property
    def workers_lost(self) -> int:
        """Actors that failed and never answered again (dead, or their restart could not be placed)."""
        return len(self.down)

    @property
    def workers_used(self) -> int:
        """Actors that finished at least one shard."""
        return sum(1 for done in self.shards_done.values() if done)

    @property
    def never_started(self) -> int:
        """Actors that finished no shard and did not fail on one: never placed or never loaded (their node
        lost while they loaded the backbone, no room for them, or the others were done first)."""
        return sum(1 for i in range(len(self.actors)) if not self.shards_done[i] and i not in self.down)
