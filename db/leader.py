"""Leader leases: one process at a time holds a named duty, judged by the database clock.

A lease is a row (name, holder, term, expires_at). Holding it is a compare-and-set
UPDATE that succeeds only for the current holder or once the lease has expired by the
database's clock, so no two hosts disagree on whether it expired. The term grows by one
on every change of holder: a duty's writes are compare-and-sets of their own, and the
term says in logs and status which reign a pass belonged to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.clock import db_now, db_time_after
from db.models import LeaderLease


@dataclass(frozen=True, slots=True)
class LeaseView:
    holder: str
    term: int
    expires_at: datetime
    expired: bool


def read_lease(session: Session, name: str) -> LeaseView | None:
    """The lease as the database sees it now (expired by its own clock or not)."""
    row = session.execute(
        select(
            LeaderLease.holder,
            LeaderLease.term,
            LeaderLease.expires_at,
            LeaderLease.expires_at < db_now(),
        ).where(LeaderLease.name == name)
    ).first()
    if row is None:
        return None
    return LeaseView(str(row[0]), int(row[1]), row[2], bool(row[3]))


def hold_lease(session: Session, name: str, holder: str, ttl_s: float) -> int | None:
    """Take the lease (when expired or absent) or renew it (when `holder` has it) for
    `ttl_s` seconds of the database's clock; the term held, or None when another holds it."""
    renewed = session.execute(
        update(LeaderLease)
        .where(
            LeaderLease.name == name,
            or_(LeaderLease.holder == holder, LeaderLease.expires_at < db_now()),
        )
        .values(
            term=case((LeaderLease.holder == holder, LeaderLease.term), else_=LeaderLease.term + 1),
            holder=holder,
            expires_at=db_time_after(ttl_s),
        )
        .returning(LeaderLease.term)
        .execution_options(synchronize_session=False)
    ).first()
    if renewed is not None:
        return int(renewed[0])
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    created = session.execute(
        insert(LeaderLease)
        .values(name=name, holder=holder, term=1, expires_at=db_time_after(ttl_s))
        .on_conflict_do_nothing(index_elements=[LeaderLease.name])
        .returning(LeaderLease.term)
    ).first()
    return None if created is None else int(created[0])


def release_lease(session: Session, name: str, holder: str) -> bool:
    """Give the lease up at once (a clean shutdown), so the next holder need not wait it out."""
    released = session.execute(
        update(LeaderLease)
        .where(LeaderLease.name == name, LeaderLease.holder == holder)
        .values(expires_at=db_time_after(-1.0))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(released, "rowcount", 0))
