"""Jobs left maybe sent (PENDING, marked as sent to a provider, no task known: their process died between the mark
and the submit's answer) are looked up in their provider's task list by their state once their submit is surely over:
one found is adopted and followed to its end, one surely never taken is ended (interrupted, its hold released), the
others are left."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters import Listed, TaskStatus, TaskView, UpstreamUnavailable
from adapters.replies import parse_all_tasks
from relay.core.events import JobEvent
from relay.core.maybe_sent import (
    ABSENT_REASON,
    CLOCK_SKEW_S,
    FIND_AFTER_TIMEOUTS,
    LIST_CUT_AT,
    LIST_RETRY_S,
    READ_RETRY_S,
    look_up_states,
)
from relay.domain import JobState
from relay.services import Relay
from relay.store import presence
from relay.store.jobs import JobRow, JobStore, Sending
from relay.store.keys import KeyRecord, KeyStore
from relay.store.leases import Leases
from relay.store.slots import Slots
from relay.store.tables import jobs
from tests.unit.test_coordination_store import LEASE
from tests.unit.test_jobs import SwitchableUpstream, relays_on_one_database
from tests.unit.test_presence import connect, migrated
from tests.unit.test_store import NOW, job
from tests.unit.test_unsent_jobs import EITHER_STORE, kite

pytestmark = pytest.mark.anyio


@pytest.mark.postgres
async def test_only_jobs_marked_long_enough_ago_and_held_by_nobody_alive_are_claimed() -> None:
    """Claimed: a gone process's job marked before its provider's time, one whose lease ran out, the claimer's own.
    Not: one marked since, one never marked (never sent: `claim_unsent`'s), one whose task a hook noted (a running
    job, adopted as such), a live process's, one of a provider not asked about."""
    async with migrated() as (url, database):
        record, _ = await KeyStore(database.engine).create("k", 100, NOW)
        stores = {owner: JobStore(database.engine, owner=owner, lease_s=LEASE) for owner in ("a", "b", "c")}
        mine = {
            "a": ["job_old", "job_new", "job_unmarked", "job_noted", "job_other"],
            "b": ["job_alive"],
            "c": ["job_own"],
        }
        for owner, ids in mine.items():
            assert await stores[owner].open(record.id, [job(i) for i in ids], NOW)
        for owner, job_id, provider, at in (
            ("a", "job_old", "up", NOW),
            ("a", "job_new", "up", NOW + 20),
            ("a", "job_other", "down", NOW),
            ("b", "job_alive", "up", NOW),
            ("c", "job_own", "up", NOW),
        ):
            assert await stores[owner].mark_sending_many([Sending(job_id, provider)], at) == [True]
        assert await stores["a"].note_task("job_noted", "up", "task-1", NOW)
        dying, alive = await connect(url), await connect(url)
        try:
            assert await presence.announce(dying, "a", presence.new_key(), NOW)
            assert await presence.announce(alive, "b", presence.new_key(), NOW)
            claimer = Leases(database.engine, "c", LEASE, presence=True)
            before = {"up": NOW + 10}
            assert [row.id for row in await claimer.claim_maybe_sent(NOW + 1, before)] == ["job_own"]
            await dying.close()
            claimed = await claimer.claim_maybe_sent(NOW + 1, before)
            assert sorted(row.id for row in claimed) == ["job_old", "job_own"]
            assert all(row.owner == "c" and row.state is JobState.PENDING for row in claimed)
            assert await claimer.claim_maybe_sent(NOW + 1, {}) == []
            # a live process's lease that ran out (it stalled) makes its job claimable too
            claimed = await claimer.claim_maybe_sent(NOW + LEASE + 1, before)
            assert sorted(row.id for row in claimed) == ["job_alive", "job_old", "job_own"]
        finally:
            await alive.close()


def _marked_long_ago(relay: Relay) -> float:
    settings = relay.pool.settings["sim"]
    return time.time() - FIND_AFTER_TIMEOUTS * (settings.connect_timeout_s + settings.timeout_s) - 5


async def _left_by_a_dead_process(relay: Relay, key: KeyRecord, marks: Mapping[str, float]) -> None:
    """Jobs a process that died (its lease run out; on SQLite an earlier run) left marked as sent at `marks`."""
    dead = JobStore(relay.db.engine, owner="a-process-that-died", lease_s=0)
    now = time.time()
    assert await dead.open(key.id, [kite(job_id, now) for job_id in marks], now)
    for job_id, at in marks.items():
        assert await dead.mark_sending_many([Sending(job_id, "sim")], at) == [True]


@EITHER_STORE
async def test_a_job_found_by_its_state_is_followed_and_one_never_taken_is_ended(
    relay_on_either: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, upstream, key = relay_on_either
    long_ago = _marked_long_ago(relay)
    await _left_by_a_dead_process(relay, key, {"job_taken": long_ago, "job_never": long_ago, "job_fresh": time.time()})
    upstream.engine.submit("imagine", {"prompt": "a kite", "state": "job_taken"}, "fast")
    submits = upstream.engine.submits
    ended: list[JobEvent] = []
    subscription = relay.events.subscribe(["job_taken"])
    try:
        assert await relay.maybe_sent.round() == 2
        while not ended or not ended[-1].state.terminal:
            event = await subscription.next(10)
            assert event is not None
            ended.append(event)
    finally:
        subscription.close()
    taken, never, fresh = [await relay.store.get(i) for i in ("job_taken", "job_never", "job_fresh")]
    assert taken is not None and (taken.state, taken.hold_state) == (JobState.SUCCEEDED, "captured")
    assert taken.owner == relay.process_id
    assert never is not None and (never.state, never.error_code) == (JobState.FAILED, "interrupted")
    assert never.fail_reason == ABSENT_REASON and never.hold_state == "released"
    assert fresh is not None and fresh.state is JobState.PENDING  # its submit may still be answered
    current = await relay.keys.get(key.id)
    assert current is not None and (current.balance, current.held) == (98, 2)  # one charged, one still held
    assert upstream.engine.submits == submits  # nothing sent again
    shown = relay.metrics.render().decode()
    assert 'mj_relay_maybe_sent_jobs_total{outcome="adopted",provider="sim"} 1.0' in shown
    assert 'mj_relay_maybe_sent_jobs_total{outcome="ended",provider="sim"} 1.0' in shown


async def test_a_job_whose_adoption_fails_holds_up_none_of_the_others_and_is_looked_up_again(tmp_path: Path) -> None:
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 1, postgres=False) as ((relay,), key):
        long_ago = _marked_long_ago(relay)
        await _left_by_a_dead_process(relay, key, {"job_x": long_ago, "job_y": long_ago})
        for job_id in ("job_x", "job_y"):
            upstream.engine.submit("imagine", {"prompt": "a kite", "state": job_id}, "fast")
        adopt = relay.store.adopt

        async def failing_once(job_id: str, *args: Any) -> JobRow | None:
            if job_id == "job_x" and not failed:
                failed.append(job_id)
                raise OSError("the database went away")
            return await adopt(job_id, *args)

        failed: list[str] = []
        relay.store.adopt = failing_once  # type: ignore[method-assign]
        assert await relay.maybe_sent.round() == 1
        x, y = [await relay.store.get(i) for i in ("job_x", "job_y")]
        assert x is not None and x.state is JobState.PENDING
        assert y is not None and y.state is not JobState.PENDING
        assert await relay.maybe_sent.round() == 1
        x = await relay.store.get("job_x")
        assert x is not None and x.state is not JobState.PENDING and failed == ["job_x"]


@EITHER_STORE
async def test_a_job_this_process_is_submitting_is_not_looked_up(
    relay_on_either: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, _, key = relay_on_either
    await _left_by_a_dead_process(relay, key, {"job_never": _marked_long_ago(relay)})
    relay.maybe_sent._submitting = lambda job_id: True
    assert await relay.maybe_sent.round() == 0
    row = await relay.store.get("job_never")
    assert row is not None and row.state is JobState.PENDING


@EITHER_STORE
async def test_the_first_answer_among_listed_jobs_is_read_in_bounded_lists(
    relay_on_either: tuple[Relay, SwitchableUpstream, KeyRecord],
) -> None:
    relay, _, key = relay_on_either
    store = relay.store
    now = time.time()
    assert await store.open(key.id, [kite(i, now) for i in ("job_a", "job_b", "job_unanswered")], now)
    await store.mark_submitted("job_a", "sim", "task-a", now + 20)
    await store.mark_submitted("job_b", "sim", "task-b", now + 10)
    others = [f"other_{i}" for i in range(1200)] + ["x" * 100_000]  # other clients' states, in several lists
    assert await store.first_answered([*others, "job_a", "job_unanswered", "job_b"]) == now + 10
    assert await store.first_answered([*others, "job_unanswered"]) is None
    assert await store.first_answered([]) is None


class Listing(SwitchableUpstream):
    """A provider whose task list is `answer`: none (a dialect that looks tasks up by id only), a list, or an
    error."""

    def __init__(self, answer: Listed | Exception | None) -> None:
        super().__init__()
        self.answer = answer
        self.lookups = 0

    async def list_tasks(self) -> Listed | None:
        self.lookups += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


# A cut list that does not reach back to the marks: its 100 tasks taken long after them, none of them the relay's.
NOTHING_KNOWN = Listed(
    tuple(TaskView(f"t{i}", TaskStatus.SUCCESS, state=f"other_{i}", submit_time=2**62) for i in range(LIST_CUT_AT)),
    frozenset(),
    LIST_CUT_AT,
)


@pytest.mark.parametrize(
    ("answer", "asked_again_after"),
    [(None, LIST_RETRY_S), (UpstreamUnavailable("GET answered HTTP 502"), READ_RETRY_S), (NOTHING_KNOWN, None)],
    ids=["no-list", "list-unread", "nothing-known"],
)
async def test_a_lookup_that_tells_nothing_is_not_made_again_every_round(
    tmp_path: Path, answer: Listed | Exception | None, asked_again_after: float | None
) -> None:
    """A provider with no list is asked again ten minutes on, one whose list could not be read half a minute on;
    a job its provider's list told nothing of is not looked up again (a later list reaches back less far still).
    The job is left PENDING, its hold kept, for the pending sweep."""
    upstream = Listing(answer)
    async with relays_on_one_database(tmp_path, upstream, 1, postgres=False) as ((relay,), key):
        await _left_by_a_dead_process(relay, key, {"job_left": _marked_long_ago(relay)})
        assert await relay.maybe_sent.round() == 0
        assert await relay.maybe_sent.round() == 0
        assert upstream.lookups == 1
        row = await relay.store.get("job_left")
        assert row is not None and row.state is JobState.PENDING and row.owner == relay.process_id
        now = time.time()
        if asked_again_after is None:
            assert list(relay.maybe_sent.marked_before(now)) == ["sim"]
            return
        assert relay.maybe_sent.marked_before(now) == {}
        assert list(relay.maybe_sent.marked_before(now + asked_again_after)) == ["sim"]


@pytest.mark.postgres
async def test_two_processes_looking_up_at_once_settle_each_job_once(tmp_path: Path) -> None:
    """Each job left maybe sent is claimed by one of them: looked up once, adopted or ended once."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 2) as ((a, b), key):
        long_ago = _marked_long_ago(a)
        taken = [f"job_taken_{i}" for i in range(10)]
        await _left_by_a_dead_process(a, key, {job_id: long_ago for job_id in [*taken, "job_never"]})
        for job_id in taken:
            upstream.engine.submit("imagine", {"prompt": "a kite", "state": job_id}, "fast")
        settled = await asyncio.gather(a.maybe_sent.round(), b.maybe_sent.round())
        assert sum(settled) == 11
        async with a.db.engine.connect() as conn:
            states = {row.id: row.state for row in await conn.execute(select(jobs.c.id, jobs.c.state))}
        assert states["job_never"] == "FAILED"
        assert all(states[job_id] in ("SUBMITTED", "IN_PROGRESS", "SUCCEEDED") for job_id in taken)


@pytest.mark.postgres
async def test_a_slot_reservation_writes_when_the_job_was_marked() -> None:
    """With `max_in_flight`, the reservation is the job's mark: its time is the one a lookup waits from."""
    async with migrated() as (_, database):
        record, _ = await KeyStore(database.engine).create("k", 100, NOW)
        store = JobStore(database.engine, owner="a", lease_s=LEASE)
        assert await store.open(record.id, [job("job_reserved")], NOW)
        assert await Slots(database.engine, LEASE, "a").take("job_reserved", "up", 5, NOW + 30)
        row = await store.get("job_reserved")
        assert row is not None and (row.provider, row.updated_at) == ("up", NOW + 30)


# -- what a task list says (pure) ------------------------------------------------------------------------------------

MARK = 1_700_000_000.0  # when the submits looked up were marked, unix seconds


def listed(*tasks: tuple[str, str | None, float]) -> Listed:
    """A task list of (task id, state, submitTime in seconds) tasks."""
    data = [
        {"id": i, "status": "SUCCESS", "progress": "100%", "state": state, "submitTime": int(at * 1000)}
        for i, state, at in tasks
    ]
    return parse_all_tasks(200, json.dumps(data).encode())


def test_a_whole_task_list_finds_a_state_or_says_it_is_absent() -> None:
    """novicezk lists every task it keeps: a state no task carries was never taken, however new the tasks are."""
    lookup = look_up_states(listed(("t2", "job_b", MARK + 5), ("t1", None, MARK + 1)), {"job_a": MARK, "job_b": MARK})
    assert {state: view.upstream_id for state, view in lookup.found.items()} == {"job_b": "t2"}
    assert lookup.absent == {"job_a"}
    assert look_up_states(listed(), {"job_a": MARK}).absent == {"job_a"}


def newest(count: int, oldest_s: float) -> list[tuple[str, str | None, float]]:
    """`count` tasks of other clients, a second apart, the oldest taken at `oldest_s`, newest first."""
    return [(f"t{i}", f"other_{i}", oldest_s + count - 1 - i) for i in range(count)]


def test_a_cut_task_list_says_absent_only_back_to_its_oldest_task() -> None:
    """trueai lists its newest 100 tasks: one missing from them was never taken only if the list reaches back to the
    moment it could have been (with room for the upstream's clock to run behind)."""
    cut = listed(*newest(LIST_CUT_AT, MARK))
    reaching = MARK + CLOCK_SKEW_S
    marks = {"job_early": MARK, "job_within_skew": reaching - 1, "job_late": reaching, "job_later": reaching + 1}
    lookup = look_up_states(cut, marks)
    assert lookup.found == {} and lookup.absent == {"job_late", "job_later"}
    untimed = parse_all_tasks(200, json.dumps([{"id": f"t{i}", "state": "x"} for i in range(LIST_CUT_AT)]).encode())
    assert look_up_states(untimed, {"job_late": reaching}).absent == frozenset()  # no time: reaches back to nothing


def test_a_cut_task_list_reaches_back_past_a_mark_by_a_job_answered_before_it() -> None:
    """A cut list that holds one of the relay's own jobs, whose submit was answered before a mark (by the relay's
    clock alone), holds every task taken since that mark, however the upstream's clock runs."""
    cut = listed(*newest(LIST_CUT_AT, MARK + 1000))  # by the upstream's clock, all taken long after the marks
    marks = {"job_before": MARK - 1, "job_at": MARK, "job_after": MARK + 1}
    assert look_up_states(cut, marks).absent == frozenset()
    assert look_up_states(cut, marks, answered_before=MARK).absent == {"job_at", "job_after"}


def test_a_state_of_a_task_that_cannot_be_read_or_carried_twice_is_not_known() -> None:
    """A task the relay cannot read may be the job's: not absent. Two tasks of one state: not the job's to pick."""
    unreadable = {"id": None, "status": "SUCCESS", "state": "job_a"}
    twice = [("t1", "job_b", MARK + 1), ("t2", "job_b", MARK + 2)]
    data = [unreadable, *({"id": i, "state": st, "submitTime": int(at * 1000)} for i, st, at in twice)]
    data.append({"id": "t3", "state": "job_c", "submitTime": int(MARK * 1000)})
    lookup = look_up_states(parse_all_tasks(200, json.dumps(data).encode()), {"job_a": MARK, "job_b": MARK, "job_c": 0})
    assert list(lookup.found) == ["job_c"] and lookup.absent == frozenset()
