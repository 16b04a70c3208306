"""The DICOM node's work queue and ledger on disk: nothing lost, nothing done twice, across a SIGKILL.

Layout of the node's work folder::

    incoming/<key>.dcm        an accepted radiograph waiting for inference (written to tmp/, fsynced, renamed)
    outbox/<key>/<kind>.dcm   its results waiting to be sent (the folder renamed into place when complete)
    tmp/                      partial writes; emptied at start
    ledger.sqlite             one row per (source SOP Instance UID, bundle version)

``<key>`` is a digest of (SOP Instance UID, version), safe as a file name whatever the UID holds.

An item moves ``queued`` -> ``outbox`` -> ``sent``, or to ``refused`` (with the reason) at any step before
``sent``. Each move is one SQLite transaction, made only after the files it points at are on disk, so a
process killed at any instant restarts into a state it can finish: a ``queued`` row still has its file (it is
inferred again: same input, same deterministic result UIDs), an ``outbox`` row still has its results (sent
again: the PACS already holding those SOP Instance UIDs keeps one copy). A file renamed into incoming/ whose row
was never written is found by :meth:`NodeQueue.recover` and queued. The ledger is what makes a re-sent study
add nothing: a (SOP Instance UID, version) already present is not queued again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

QUEUED, OUTBOX, SENT, REFUSED = "queued", "outbox", "sent", "refused"
STATES = (QUEUED, OUTBOX, SENT, REFUSED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    sop_instance_uid TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    received REAL NOT NULL,
    updated REAL NOT NULL,
    results TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sop_instance_uid, version)
)
"""


COLUMNS = "sop_instance_uid, version, state, study_instance_uid, reason, attempts, next_attempt, results"


@dataclass(frozen=True)
class Item:
    """One ledger row."""

    sop_instance_uid: str
    version: str
    state: str
    study_instance_uid: str
    reason: str
    attempts: int
    next_attempt: float
    results: str


def item_key(sop_instance_uid: str, version: str) -> str:
    """File-name-safe key of (SOP Instance UID, version)."""
    return hashlib.sha256(f"{sop_instance_uid}\0{version}".encode()).hexdigest()[:32]


def _write_durably(dataset: Dataset, path: Path) -> None:
    with open(path, "wb") as stream:
        dataset.save_as(stream, enforce_file_format=True)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class NodeQueue:
    """The queue and ledger in ``folder`` for the bundle ``version`` (items of other versions are kept apart).

    Safe to use from several threads of one process (the Storage SCP's handler and the worker): every call
    opens its own SQLite connection. One process at a time: the folder is locked (``flock`` on ``lock``, freed by
    :meth:`close` or when the process ends, a SIGKILL included), since a second worker would empty tmp/ under
    the first and share its staging names.

    Raises:
        RuntimeError: another process holds the folder (its pid named).
    """

    def __init__(self, folder: str | os.PathLike, version: str) -> None:
        self.folder = Path(folder)
        self.version = str(version)
        self.incoming, self.outbox, self.tmp = (self.folder / name for name in ("incoming", "outbox", "tmp"))
        for path in (self.incoming, self.outbox, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise RuntimeError(f"{self.folder}: the work folder is in use by another node process (pid {holder})")
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.ledger_path = self.folder / "ledger.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def close(self) -> None:
        """Free the folder for another process."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.ledger_path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        return db

    # --- receiving ---------------------------------------------------------------------------------------

    def item(self, sop_instance_uid: str) -> Item | None:
        """The row of (SOP Instance UID, this version), None when never seen."""
        with self._connect() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM items WHERE sop_instance_uid=? AND version=?",
                             (sop_instance_uid, self.version)).fetchone()
        return Item(*row) if row else None

    def put_file(self, path: Path, sop_instance_uid: str, study_instance_uid: str = "") -> bool:
        """Queue a checked radiograph already written (and fsynced) at ``path`` in tmp/; False when the
        (SOP Instance UID, version) is already known (the file is then deleted): a re-sent image adds nothing."""
        if self.item(sop_instance_uid) is not None:
            path.unlink(missing_ok=True)
            return False
        target = self.incoming / f"{item_key(sop_instance_uid, self.version)}.dcm"
        os.replace(path, target)
        _fsync_folder(self.incoming)
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO items (sop_instance_uid, version, state, study_instance_uid, "
                       "received, updated) VALUES (?, ?, ?, ?, ?, ?)",
                       (sop_instance_uid, self.version, QUEUED, study_instance_uid, now, now))
        return True

    def stage(self, dataset: Dataset) -> Path:
        """Write a received ``dataset`` durably into tmp/ (for checking, then :meth:`put_file`); its path.

        Raises OSError when it cannot be stored, and pydicom's errors when it cannot be encoded.
        """
        uid = str(dataset.SOPInstanceUID)
        path = self.tmp / f"{item_key(uid, self.version)}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            _write_durably(dataset, path)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return path

    def refuse(self, sop_instance_uid: str, reason: str, study_instance_uid: str = "", new: bool = False) -> bool:
        """Record a refusal (kept: the same image sent again is refused again without work); True when recorded.

        Args:
            new: a refusal at admission: recorded only when the image is not already known (a second copy of
                an image another association has just queued must not undo that).
        """
        now = time.time()
        with self._connect() as db:
            if new:
                written = db.execute(
                    "INSERT OR IGNORE INTO items (sop_instance_uid, version, state, study_instance_uid, reason, "
                    "received, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sop_instance_uid, self.version, REFUSED, study_instance_uid, reason, now, now)).rowcount
                if not written:
                    return False
            else:
                db.execute("INSERT INTO items (sop_instance_uid, version, state, study_instance_uid, reason, "
                           "received, updated) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_instance_uid, version) "
                           "DO UPDATE SET state=excluded.state, reason=excluded.reason, updated=excluded.updated",
                           (sop_instance_uid, self.version, REFUSED, study_instance_uid, reason, now, now))
        self._remove_files(sop_instance_uid)
        return True

    # --- working -----------------------------------------------------------------------------------------

    def recover(self) -> int:
        """At start: empty tmp/, remove the files of finished items (a kill between the row and the clean-up),
        and queue incoming files whose row was never written; returns how many were queued."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            states = {item_key(uid, self.version): (uid, state) for uid, state in
                      db.execute("SELECT sop_instance_uid, state FROM items WHERE version=?", (self.version,))}
        for uid, state in states.values():
            if state in (SENT, REFUSED):
                self._remove_files(uid)
        recovered = 0
        for path in sorted(self.incoming.glob("*.dcm")):
            if path.stem in states:
                continue
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                uid = str(header.SOPInstanceUID)
            except Exception:  # a file that cannot be read back cannot be keyed: drop it (never acknowledged)
                path.unlink(missing_ok=True)
                continue
            if path.stem != item_key(uid, self.version):
                continue  # another bundle version's item: that version's node finishes it
            now = time.time()
            with self._connect() as db:
                db.execute("INSERT OR IGNORE INTO items (sop_instance_uid, version, state, study_instance_uid, "
                           "received, updated) VALUES (?, ?, ?, ?, ?, ?)",
                           (uid, self.version, QUEUED, str(header.get("StudyInstanceUID", "")), now, now))
            recovered += 1
        return recovered

    def items(self, state: str | None = None) -> list[Item]:
        """Ledger rows of this version (in a state), oldest first."""
        query = f"SELECT {COLUMNS} FROM items WHERE version=?"
        parameters: tuple = (self.version,)
        if state is not None:
            query += " AND state=?"
            parameters += (state,)
        with self._connect() as db:
            return [Item(*row) for row in db.execute(query + " ORDER BY received", parameters)]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for item in self.items():
            counts[item.state] += 1
        return counts

    def incoming_path(self, sop_instance_uid: str) -> Path:
        return self.incoming / f"{item_key(sop_instance_uid, self.version)}.dcm"

    def outbox_path(self, sop_instance_uid: str) -> Path:
        return self.outbox / item_key(sop_instance_uid, self.version)

    def set_results(self, sop_instance_uid: str, results: Mapping[str, Dataset]) -> None:
        """Store an item's results in its outbox folder, then mark it ``outbox`` and drop its input."""
        staging = self.tmp / f"{item_key(sop_instance_uid, self.version)}.outbox"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for kind, dataset in results.items():
            _write_durably(dataset, staging / f"{kind}.dcm")
        _fsync_folder(staging)
        target = self.outbox_path(sop_instance_uid)
        shutil.rmtree(target, ignore_errors=True)  # a half-finished earlier try
        os.replace(staging, target)
        _fsync_folder(self.outbox)
        summary = ",".join(f"{kind}={dataset.SOPInstanceUID}" for kind, dataset in results.items())
        with self._connect() as db:
            db.execute("UPDATE items SET state=?, results=?, attempts=0, next_attempt=0, reason='', updated=? "
                       "WHERE sop_instance_uid=? AND version=?",
                       (OUTBOX, summary, time.time(), sop_instance_uid, self.version))
        self.incoming_path(sop_instance_uid).unlink(missing_ok=True)

    def results(self, sop_instance_uid: str) -> list[Dataset]:
        """The outbox datasets of an item, in a fixed order (by kind)."""
        return [pydicom.dcmread(path) for path in sorted(self.outbox_path(sop_instance_uid).glob("*.dcm"))]

    def due(self, state: str = OUTBOX, now: float | None = None) -> Iterator[Item]:
        """Items in ``state`` (``outbox``: to send; ``queued``: to infer) whose next attempt is due."""
        now = time.time() if now is None else now
        return (item for item in self.items(state) if item.next_attempt <= now)

    def attempt_failed(self, sop_instance_uid: str, reason: str, next_attempt: float) -> None:
        """An inference or sending attempt failed for a reason that may pass: count it, retry after a wait."""
        with self._connect() as db:
            db.execute("UPDATE items SET attempts=attempts+1, next_attempt=?, reason=?, updated=? "
                       "WHERE sop_instance_uid=? AND version=?",
                       (next_attempt, reason, time.time(), sop_instance_uid, self.version))

    def sent(self, sop_instance_uid: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE items SET state=?, reason='', updated=? WHERE sop_instance_uid=? AND version=?",
                       (SENT, time.time(), sop_instance_uid, self.version))
        shutil.rmtree(self.outbox_path(sop_instance_uid), ignore_errors=True)

    def _remove_files(self, sop_instance_uid: str) -> None:
        self.incoming_path(sop_instance_uid).unlink(missing_ok=True)
        shutil.rmtree(self.outbox_path(sop_instance_uid), ignore_errors=True)
