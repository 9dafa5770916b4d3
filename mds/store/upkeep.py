"""Upkeep across tiers: ``maintain()`` (durable-tier upkeep, LMDB purge) and ``check()``
(the durable tier's integrity, lost commits, LMDB's own check and LMDB against the durable tier).
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import numpy as np

from mds.errors import InvalidRequestError
from mds.models import CheckReport, MaintenanceReport
from mds.store.changes import ChangeSlots
from mds.store.health import BACKEND_ERRORS, Tiers, checked
from mds.tiers.durable import DurableTier, SharedHistory
from mds.timeframes import Timeframe, parse_timeframe

logger = logging.getLogger(__name__)


def maintain(tiers: Tiers, force: bool) -> MaintenanceReport:
    """See ``Store.maintain`` (call under the store lock)."""
    before = after = 0.0
    vacuumed = analyzed = False
    db = tiers.tier("sqlite")
    if db is not None:
        rep = tiers.off_lock(db, "maintain", writable=True)(force=force)  # a server's VACUUM stalls no reader
        before = float(rep.get("fragmentation_before", 0.0))
        after = float(rep.get("fragmentation_after", before))
        vacuumed = bool(rep.get("vacuumed", False))
        analyzed = bool(rep.get("analyzed", False))
    purged = 0
    disk = tiers.tier("disk")
    if disk is not None:
        purged = int(tiers.guard("disk", disk.purge_expired) or 0)
    return MaintenanceReport(before, after, vacuumed, analyzed, purged)


def check(tiers: Tiers, slots: ChangeSlots, lock: Any = None) -> CheckReport:
    """See ``Store.check`` (call under the store lock, after listing degraded tiers)."""
    problems = [f"{name}: degraded ({s.error})" for name, s in tiers.states.items() if s.degraded_at is not None]
    db = tiers.tier("sqlite")
    if db is not None:
        name = tiers.durable_name.lower()
        integrity = tiers.off_lock(db, "integrity_problems")  # a server's full pass stalls no reader
        problems += checked(name, lambda: [f"{name}: {p}" for p in integrity()])
    if db is not None:
        try:
            lost = _lost_commits(tiers, slots, db)
        except BACKEND_ERRORS as exc:
            lost = f"{tiers.durable_name.lower()}: cannot read its record of commits: {exc}"
        if lost:
            problems.append(lost)
        elif slots.acked is None and tiers.history is None:
            problems.append(
                "sqlite: no record of acknowledged commits (changes.bin unavailable): "
                "cannot tell whether acknowledged writes were lost"
            )
    disk = tiers.tier("disk")
    if disk is not None:
        problems += checked("disk", lambda: [f"disk: {p}" for p in disk.check()])
        if db is not None:
            problems += checked("disk vs sqlite", lambda: _disk_vs_durable(tiers, slots, db, disk, lock))
    return CheckReport(not problems, tuple(problems))


def _disk_vs_durable(tiers: Tiers, slots: ChangeSlots, db: DurableTier, disk: Any, lock: Any) -> list[str]:
    problems: list[str] = []
    shared = tiers.history is not None and lock is not None
    # every series either tier knows: a series only LMDB holds is compared too (the durable tier
    # then answers nothing there, so any row LMDB would serve is reported)
    names = {(sym, tfname) for sym, tfname, *_ in db.series()}
    try:
        names |= set(disk.series())
    except BACKEND_ERRORS as exc:
        problems.append(f"disk: cannot list its series: {exc}")
    for sym, tfname in sorted(names):
        try:
            tf = parse_timeframe(tfname)
        except InvalidRequestError:
            problems.append(f"disk: holds a series of an unknown timeframe {sym!r} {tfname!r}")
            continue
        for _ in range(20):  # compare a stable state: no write to the series in between
            token = slots.stamp(sym, tf)
            if token is not None and token & 1:
                time.sleep(0.005)
                continue
            found = _compare(tiers, db, disk, sym, tf)
            if found and shared and _moved_after_release(lock, slots, sym, tf, token):
                continue  # another host's change was waiting for the lock to drop the span: again
            if slots.stamp(sym, tf) == token:
                problems += found
                break
    return problems


def _compare(tiers: Tiers, db: DurableTier, disk: Any, sym: str, tf: Timeframe) -> list[str]:
    held = tiers.guard("disk", disk.held, sym, tf)
    if held is None:
        return []
    out: list[str] = []
    for s, e in np.asarray(held, dtype=np.int64).reshape(-1, 2).tolist():
        # the durable tier first: a change committed after this read cannot reach LMDB before the
        # compare (its feed callback waits for the store lock), so both sides are of one moment
        b = db.read_range(sym, tf, s, e)
        a = tiers.guard("disk", disk.get_range, sym, tf, s, e)
        if a is not None and (len(a) != len(b) or a.tobytes() != b.tobytes()):
            out.append(f"disk: {sym} {tf.name} [{s}, {e}) differs from {tiers.durable_name}")
    return out


#: How long check() lets a shared durable tier's pending change reach this host before it reports
#: a difference between LMDB and the server.
_FEED_GRACE_S = 0.5


def _moved_after_release(lock: Any, slots: ChangeSlots, sym: str, tf: Timeframe, token: int | None) -> bool:
    """Release the store lock for a moment so that a change another host committed before the
    compare (its feed callback waits for the lock) can drop the span; whether the series' stamp
    moved meanwhile (then the difference was that change on its way, not a defect)."""
    held = lock._release_save()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < _FEED_GRACE_S:
            if slots.stamp(sym, tf) != token:
                return True
            time.sleep(0.01)
        return False
    finally:
        lock._acquire_restore(held)


def _lost_commits(tiers: Tiers, slots: ChangeSlots, db: DurableTier) -> str | None:
    """A message when the durable tier lost commits this directory acknowledged: a file this
    directory owns holds fewer than recorded (``lost_commits``), a shared server's ledger entry of
    this directory is behind the record (``SharedAcks``)."""
    if tiers.history is None:
        return slots.lost_commits(db.commit_seq)
    server = cast(SharedHistory, db)
    return None if slots.shared is None else slots.shared.lost(server.identity, server.acknowledged)


def warn_lost_commits(tiers: Tiers, slots: ChangeSlots) -> None:
    """At open: log a warning when the durable tier lost acknowledged commits (``check()``
    reports it as a problem; an unreadable record is left to the tier's reads)."""
    state = tiers.states.get("sqlite")
    if state is None or state.obj is None:
        return
    try:
        lost = _lost_commits(tiers, slots, state.obj)
    except BACKEND_ERRORS as exc:  # the tier's own reads will report it
        logger.debug("commit record unreadable at open: %s", exc)
        return
    if lost:
        logger.warning("%s", lost)
