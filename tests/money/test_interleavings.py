"""Money under concurrency, on both databases: seeded random rounds of admissions (several jobs at once, follow-ups),
endings (several writers ending the same job at once, the pending sweep against an adoption), top-ups, corrections
that would go below what is held, revocations, expiries and ledger checks, all at once on a few keys. After every
round each key's balance and held are what the calls' own answers add up to, held is never more than the balance,
no job is settled twice, a refused admission wrote nothing (and one made alone is refused exactly when it does not
fit), and `ledger check` finds no break. Taking out any of the guards of the holds, the endings or the corrections
makes it fail."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select

from relay.domain import FailureCode
from relay.store import ledger
from relay.store.db import Database
from relay.store.jobs import Admission, Ending, JobRow, JobStore, NewJob
from relay.store.keys import KeyStore
from relay.store.tables import jobs, keys

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0
HOLD_STATE = {None: "held", "capture": "captured", "release": "released"}


class Money:
    """The calls made, and what their answers say the store must hold."""

    def __init__(self, db: Database, seed: int) -> None:
        self.rng = random.Random(seed)
        self.db = db
        self.keys = KeyStore(db.engine)
        self.stores = [JobStore(db.engine, owner="a"), JobStore(db.engine, owner="b")]
        self.key_ids: list[str] = []
        self.balance: dict[str, int] = {}
        self.jobs: dict[str, tuple[str, int]] = {}  # job -> (key, price)
        self.outcome: dict[str, str | None] = {}
        self.refused: set[str] = set()
        self.now = NOW
        self.made = 0
        self.alone = False

    async def new_key(self) -> None:
        record, _ = await self.keys.create(f"k{len(self.balance)}", self.rng.choice([0, 40, 100]), self.now)
        self.key_ids.append(record.id)
        self.balance[record.id] = record.balance

    def store(self) -> JobStore:
        return self.rng.choice(self.stores)

    def some_jobs(self, count: int) -> list[str]:
        pool = [job for job, outcome in self.outcome.items() if outcome is None] + list(self.outcome)[-5:]
        return [self.rng.choice(pool) for _ in range(count)] if pool else []

    def held(self, key: str) -> int:
        return sum(price for job, (of, price) in self.jobs.items() if of == key and self.outcome[job] is None)

    def ended(self, row: JobRow) -> None:
        assert self.outcome[row.id] is None, f"job {row.id} settled twice"
        self.outcome[row.id] = "capture" if row.hold_state == "captured" else "release"
        if row.hold_state == "captured":
            self.balance[row.key_id] -= row.price

    async def admit(self) -> None:
        admissions = []
        for _ in range(self.rng.randint(1, 3)):
            key = self.rng.choice(self.key_ids)
            parent = self.rng.choice([None, *list(self.jobs)[-3:]])
            price, count = self.rng.choice([1, 2, 8]), self.rng.choice([1, 1, 2, 4])
            if self.rng.random() < 0.2:  # exactly what the key has left
                price, count = max(1, self.balance[key] - self.held(key)), 1
            deadline = self.now + self.rng.choice([-1, 600])
            new = []
            for _ in range(count):
                self.made += 1
                new.append(NewJob(f"j{self.made}", "r", "m", "fast", "MJ", "imagine", "p", price, deadline, parent))
            admissions.append(Admission(key, tuple(new)))
        before = await self.stored_keys() if self.alone else None
        admitted = await self.store().open_many(admissions, self.now)
        if before is not None:  # nothing else ran meanwhile: each request is admitted exactly when it fits
            assert admitted == self.fitting(admissions, before)
        for admission, ok in zip(admissions, admitted, strict=True):
            for job in admission.jobs:
                if ok:
                    self.jobs[job.id], self.outcome[job.id] = (admission.key_id, job.price), None
                else:
                    self.refused.add(job.id)

    async def stored_keys(self) -> dict[str, Any]:
        async with self.db.engine.connect() as conn:
            return {row.id: row for row in (await conn.execute(select(keys))).all()}

    def fitting(self, admissions: list[Admission], before: dict[str, Any]) -> list[bool]:
        """Which requests fit, tried in order, each on what its key had left available."""
        available = {key: row.balance - row.held for key, row in before.items()}
        fits = []
        for admission in admissions:
            key = before[admission.key_id]
            live = key.revoked_at is None and (key.expires_at is None or key.expires_at > self.now)
            fits.append(live and admission.total <= available[admission.key_id])
            available[admission.key_id] -= admission.total if fits[-1] else 0
        return fits

    async def finish(self) -> None:
        codes = [None, FailureCode.TIMEOUT.value, FailureCode.INTERRUPTED.value, "upstream_failed"]
        endings = [
            Ending(job, True) if self.rng.random() < 0.4 else Ending(job, False, self.rng.choice(codes))
            for job in self.some_jobs(4)
        ]
        endings += [self.rng.choice(endings) for _ in range(self.rng.randint(0, 2)) if endings]
        once = set()
        for ending, row in zip(endings, await self.store().finish_many(endings, self.now), strict=True):
            if row is not None:
                assert row.id == ending.job_id and row.id not in once, f"{row.id} ended twice by one call"
                if ending.error_code == FailureCode.TIMEOUT.value:  # only a job past its deadline times out
                    assert row.deadline_at <= self.now, f"{row.id} timed out before its deadline"
                once.add(row.id)
                self.ended(row)

    async def adopt_against_sweep(self) -> None:
        for job in self.some_jobs(1):
            adopted, (swept,) = await asyncio.gather(
                self.store().adopt(job, "p", "u" + job, self.now),
                self.store().finish_many([Ending(job, False, FailureCode.INTERRUPTED.value)], self.now),
            )
            if swept is not None:
                assert not adopted, f"{job} was both adopted and ended as never submitted"
                self.ended(swept)

    async def move(self) -> None:
        key = self.rng.choice(self.key_ids)
        below_held = self.held(key) - self.balance[key] - 1  # one credit more than the key has available
        amount = self.rng.choice([below_held or -1, -5, 3, 20, 60, 100])
        try:
            if amount > 0 and self.rng.random() < 0.7:
                await self.keys.topup(key, amount, self.now)
            else:
                await self.keys.adjust(key, amount, self.now)
        except ValueError:  # a revoked key's top-up, a correction below what is held: nothing moved
            return
        self.balance[key] += amount

    async def policy(self) -> None:
        key = self.rng.choice(self.key_ids)
        if self.rng.random() < 0.1:
            await self.keys.revoke(key, self.now)  # still asked for: its requests are refused
            await self.new_key()
        else:
            await self.keys.update(key, self.now, expires_at=self.rng.choice([None, None, self.now - 1, self.now + 5]))

    async def check(self) -> None:
        assert (await ledger.check(self.db.engine)).breaks == []

    async def round(self) -> None:
        self.now += self.rng.choice([0, 1, 7])
        ops: list[Callable[[], Awaitable[None]]] = [
            self.admit,
            self.admit,
            self.finish,
            self.finish,
            self.adopt_against_sweep,
            self.move,
            self.move,
            self.policy,
            self.check,
        ]
        count = self.rng.choice([1, 1, 3, 6])
        self.alone = count == 1
        await asyncio.gather(*(self.rng.choice(ops)() for _ in range(count)))
        await self.verify()

    async def verify(self) -> None:
        async with self.db.engine.connect() as conn:
            stored = {row.id: row for row in (await conn.execute(select(keys))).all()}
            hold_states = {
                row.id: row.hold_state for row in (await conn.execute(select(jobs.c.id, jobs.c.hold_state))).all()
            }
        for key, balance in self.balance.items():
            assert (stored[key].balance, stored[key].held) == (balance, self.held(key)), key
            assert stored[key].balance >= stored[key].held >= 0, key
        assert {job: HOLD_STATE[outcome] for job, outcome in self.outcome.items()} == hold_states
        assert not self.refused & set(hold_states)
        assert (await ledger.check(self.db.engine)).breaks == []


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_interleavings_keep_every_credit_accounted_for(db: Database, seed: int) -> None:
    money = Money(db, seed)
    for _ in range(3):
        await money.new_key()
    for _ in range(60):
        await money.round()
    # (how many admissions fit depends on how the databases interleave them: about 20 to 30 jobs)
    assert len(money.jobs) > 10 and any(o == "capture" for o in money.outcome.values()), len(money.jobs)
