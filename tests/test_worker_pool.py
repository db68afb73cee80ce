"""WorkerPool's requeue, loss and over-asking rules, with ray.wait/ray.get injected: no Ray cluster.

A FakeCluster stands in for Ray: ``probe``/``submit`` hand out refs, ``wait`` says which ref finished
(in an order the test picks), and ``get`` gives its value or raises the Ray error a scripted actor death
would give. The real actors, restarts and lost nodes are covered by tests/test_extract_faults.py and
tests/test_ray_cluster.py; here every interleaving is exact and the test takes milliseconds.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from unipt.extract import worker_pool
from unipt.extract.worker_pool import MAX_SHARD_ATTEMPTS, REPROBE_S, WorkerPool
from unipt.pipeline.cache.layout import ShardSpec
from unipt.pipeline.errors import UniptError

DESCRIPTION = {"num_hidden_states": 3}


def shards(n: int) -> list[ShardSpec]:
    return [ShardSpec(i, 10 * i, 10 * i + 10) for i in range(n)]


class Ref:
    def __init__(self, actor: int, shard: ShardSpec | None) -> None:
        self.actor, self.shard = actor, shard

    def __repr__(self) -> str:
        return f"Ref(actor={self.actor}, shard={None if self.shard is None else self.shard.shard_id})"


class FakeCluster:
    """Actors 0..n-1. ``kill_on[shard_id]`` is how many times that shard kills the actor that runs it;
    after a death, the actor's probes answer with ``after_death[actor]`` in turn (then ``then``): "back"
    (restarted), "restarting" (ActorUnavailableError) or "dead" (ActorDiedError)."""

    def __init__(self, n: int, pick: Callable[[list[Ref]], Ref] | None = None) -> None:
        self.actors = list(range(n))
        self.pick = pick or (lambda refs: refs[0])  # which finished ref ``wait`` reports
        self.kill_on: Counter[int] = Counter()
        self.after_death: dict[int, list[str]] = defaultdict(list)
        self.then = "dead"
        self.deaths: list[tuple[int, int, int]] = []  # (actor, shard id, shards submitted by then)
        self.dead: set[int] = set()  # died and not answered a probe since
        self.issued: list[Ref] = []  # refs not yet read, in the order they were handed out
        self.in_flight: Counter[int] = Counter()
        self.most_in_flight: Counter[int] = Counter()
        self.submitted: list[tuple[int, int]] = []  # (actor, shard id), in order
        self.completed: list[int] = []  # shard ids whose value ``get`` returned, in order
        self.waits: list[float] = []

    def probe(self, actor: int) -> Ref:
        ref = Ref(actor, None)
        self.issued.append(ref)
        return ref

    def submit(self, actor: int, shard: ShardSpec) -> Ref:
        assert actor not in self.dead, f"shard {shard.shard_id} sent to actor {actor}, which is dead"
        ref = Ref(actor, shard)
        self.issued.append(ref)
        self.submitted.append((actor, shard.shard_id))
        self.in_flight[actor] += 1
        self.most_in_flight[actor] = max(self.most_in_flight[actor], self.in_flight[actor])
        return ref

    def wait(self, refs: list[Ref], num_returns: int, timeout: float) -> tuple[list[Ref], list[Ref]]:
        assert num_returns == 1
        self.waits.append(timeout)
        ready = [r for r in self.issued if r in refs]
        if not ready:
            return [], refs
        ref = self.pick(ready)
        return [ref], [r for r in refs if r is not ref]

    def get(self, ref: Ref) -> dict:
        self.issued.remove(ref)
        if ref.shard is None:
            return self._answer_probe(ref.actor)
        self.in_flight[ref.actor] -= 1
        shard_id = ref.shard.shard_id
        if self.kill_on[shard_id] > 0 or ref.actor in self.dead:
            if ref.actor not in self.dead:
                self.kill_on[shard_id] -= 1
                self.deaths.append((ref.actor, shard_id, len(self.submitted)))
            self.dead.add(ref.actor)
            raise RayActorError(error_msg=f"actor {ref.actor} died running shard {ref.shard.shard_id}")
        self.completed.append(ref.shard.shard_id)
        return {"shard_id": ref.shard.shard_id, "actor": ref.actor}

    def _answer_probe(self, actor: int) -> dict:
        if actor not in self.dead:
            return DESCRIPTION
        state = self.after_death[actor].pop(0) if self.after_death[actor] else self.then
        if state == "back":
            self.dead.discard(actor)
            return DESCRIPTION
        if state == "restarting":
            raise ActorUnavailableError("restarting", None)
        raise ActorDiedError()

    def pool(self, per_actor: int = 2, **kwargs) -> WorkerPool:
        kwargs = {"probe": self.probe, "wait": self.wait, "get": self.get, "sleep": lambda s: None, **kwargs}
        return WorkerPool(self.actors, per_actor, **kwargs)


def run_all(cluster: FakeCluster, pool: WorkerPool, todo: list[ShardSpec]) -> list[dict]:
    assert pool.first_description() == DESCRIPTION
    results: list[dict] = []
    pool.run(todo, cluster.submit, results.append)
    return results


def done_once(results: list[dict], todo: list[ShardSpec]) -> None:
    ids = [r["shard_id"] for r in results]
    assert sorted(ids) == [s.shard_id for s in todo], "a shard was lost or reported twice"


def test_a_shard_whose_actor_dies_is_requeued_and_the_restarted_actor_takes_shards_again():
    cluster = FakeCluster(2)
    cluster.kill_on[2] = 1
    cluster.then = "back"
    pool = cluster.pool()
    todo = shards(8)
    results = run_all(cluster, pool, todo)
    done_once(results, todo)
    [(actor, _, submitted_by_then)] = cluster.deaths
    # Its other shard in flight failed with it: both were requeued, and each ran twice.
    assert pool.requeued == 2
    assert [s for _, s in cluster.submitted].count(2) == 2
    assert any(a == actor for a, _ in cluster.submitted[submitted_by_then:]), (
        "the restarted actor got no work"
    )
    assert pool.workers_lost == 0 and pool.workers_used == 2


def test_a_worker_lost_for_good_leaves_the_others_to_finish():
    cluster = FakeCluster(3)
    cluster.kill_on[4] = 1
    pool = cluster.pool()
    todo = shards(12)
    results = run_all(cluster, pool, todo)
    done_once(results, todo)
    [(actor, _, submitted_by_then)] = cluster.deaths
    assert all(a != actor for a, _ in cluster.submitted[submitted_by_then:]), "a shard went to the dead actor"
    # Its other shard in flight failed with it: both were requeued and done by the two left.
    assert pool.requeued == 2
    assert pool.lost == {actor} and pool.workers_lost == 1
    assert pool.never_started == 0
    # Each shard is credited to the actor that ran it.
    assert pool.shards_done == Counter(r["actor"] for r in results)
    assert pool.workers_used == 2


def test_losing_every_worker_is_one_clear_error():
    cluster = FakeCluster(2)
    cluster.kill_on.update({0: 1, 2: 1, 3: 1})
    pool = cluster.pool()
    with pytest.raises(UniptError) as caught:
        run_all(cluster, pool, shards(6))
    message = str(caught.value)
    assert message.startswith("all 2 extraction workers were lost;") and "\n" not in message
    assert "the same command resumes from them" in message
    assert pool.lost == {0, 1}


def test_a_shard_that_keeps_killing_its_workers_fails_with_advice():
    cluster = FakeCluster(2)
    cluster.kill_on[0] = MAX_SHARD_ATTEMPTS + 1
    cluster.then = "back"
    pool = cluster.pool()
    with pytest.raises(UniptError, match=f"shard 0 lost its worker {MAX_SHARD_ATTEMPTS} times") as caught:
        run_all(cluster, pool, shards(4))
    assert "lower extract.shard_size or backbone.batch_size" in str(caught.value)
    assert [s for _, s in cluster.submitted].count(0) == MAX_SHARD_ATTEMPTS


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_actor", [1, 2, 3])
def test_never_more_in_flight_than_allowed_and_every_shard_done_once(seed, per_actor):
    rng = random.Random(seed)
    cluster = FakeCluster(3, pick=rng.choice)  # refs finish in any order
    cluster.kill_on[rng.randrange(20)] = 1
    cluster.then = "back"
    pool = cluster.pool(per_actor=per_actor)
    todo = shards(20)
    results = run_all(cluster, pool, todo)
    done_once(results, todo)
    assert max(cluster.most_in_flight.values()) == per_actor  # asked up to the limit, never past it
    assert pool._shards_in_flight() == 0 and all(n == 0 for n in cluster.in_flight.values())
    assert not cluster.issued or all(r.shard is None for r in cluster.issued)  # no shard left running


def test_results_come_back_in_the_order_the_shards_finish():
    # Last submitted, first finished: on_done sees the shards in completion order, not queue order.
    cluster = FakeCluster(2, pick=lambda refs: refs[-1])
    pool = cluster.pool(per_actor=2)
    todo = shards(6)
    results = run_all(cluster, pool, todo)
    done_once(results, todo)
    assert [r["shard_id"] for r in results] == cluster.completed
    assert cluster.completed != sorted(cluster.completed)
    assert [s for _, s in cluster.submitted] == list(range(6))  # and go out in queue order


def test_a_restarting_actor_is_asked_again_until_it_is_back():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    cluster = FakeCluster(1)
    cluster.kill_on[1] = 1
    cluster.after_death[0] = ["restarting", "restarting", "back"]
    pool = cluster.pool(per_actor=1, clock=lambda: now[0], sleep=sleep)
    todo = shards(3)
    results = run_all(cluster, pool, todo)
    done_once(results, todo)
    assert slept == [REPROBE_S, REPROBE_S]  # nothing else to wait on: sleeps until the next probe
    assert pool.requeued == 1 and pool.workers_lost == 0


def test_a_backbone_that_cannot_load_fails_at_once():
    cluster = FakeCluster(3)

    def get(ref):
        raise RayActorError(error_msg="__init__ failed", actor_init_failed=True)

    pool = WorkerPool(cluster.actors, 2, probe=cluster.probe, wait=cluster.wait, get=get)
    with pytest.raises(RayActorError):
        pool.first_description()


def test_no_worker_ready_is_said_while_waiting(monkeypatch):
    monkeypatch.setattr(worker_pool, "NOTICE_EVERY_S", 0.0)
    notices: list[int] = []
    cluster = FakeCluster(1)
    answered = iter([False, False, True])  # two waits time out before the actor answers
    wait = cluster.wait
    pool = cluster.pool(
        on_no_worker_ready=lambda: notices.append(1),
        wait=lambda refs, num_returns, timeout: (
            wait(refs, num_returns, timeout) if next(answered) else ([], refs)
        ),
    )
    assert pool.first_description() == DESCRIPTION
    assert len(notices) == 2
