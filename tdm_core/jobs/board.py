"""The jobs' shared state: one lock, the tables it guards, and the one way a record change reaches disk and listeners.

The manager (commands and queries), the worker (the training loop) and the output writer (a job's files) all work
on one `JobBoard` and on nothing of each other's, so none of them depends on another's internals and the package has
no import cycle: `board` needs only `records`, and everything else needs `board`.

The lock guards memory only and is never held across I/O or while a model moves between devices: a change is made
under it and a snapshot of the record taken in the same hold, and the snapshot is written (fsynced) after it is
released. `records.RecordStore` keeps the writes of one job in snapshot order and drops those that come after the job
was removed, so a write that lost a race to a newer change or to a removal is skipped, never an error. Status reads,
and so the HTTP routes, only ever wait for in-memory work.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .records import JobRecord, RecordStore


class JobBoard:
    """The jobs' tables under one lock, and their commit (change in memory, write to disk) and publication (wait()
    and the listener). Touch the tables only while holding `lock`."""

    def __init__(self, store: RecordStore, listener: Callable[[str, dict], Any] | None = None):
        self.store = store
        self.listener = listener
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified when the queue, a settled state or `closed` changes
        self.records: dict[str, JobRecord] = {}
        self.settled: dict[str, str] = {}  # each job's state as last written (what wait() answers with)
        self.runtimes: dict[str, Any] = {}
        self.stops: dict[str, threading.Event] = {}
        self.queue: deque[str] = deque()
        self.previews: dict[str, Any] = {}
        self.reserved: set[str] = set()  # output names (new jobs) and job ids (resumes) whose record is being written
        self.closed = False

    def listed(self, record: JobRecord) -> bool:
        """Whether `record` is still on the board (not removed meanwhile); call under the lock."""
        return self.records.get(record.id) is record

    def forget(self, job_id: str) -> None:
        """Takes a removed job off every table (call under the lock)."""
        for table in (self.records, self.settled, self.runtimes, self.stops, self.previews):
            table.pop(job_id, None)

    # ---- record changes: in memory under the lock, on disk after it -------------------------------------------------
    def read(self, record: JobRecord, view: Callable[[JobRecord], Any]) -> Any:
        """`view(record)` under the lock, nothing written."""
        with self.lock:
            return view(record)

    def commit(self, record: JobRecord, change: Callable[[JobRecord], Any]) -> Any:
        """Applies `change` to the record under the lock, then writes the record outside it; raises if the write
        fails (the change stays in memory) or if `change` raises (nothing is written)."""
        with self.lock:
            result = change(record)
            snapshot = self.store.snapshot(record)
        self.store.write(snapshot)
        return result

    def commit_or_note(self, record: JobRecord, change: Callable[[JobRecord], Any]) -> Any:
        """`commit`, but a failed write (a full disk, a read-only folder) is noted in the record's message instead
        of raised: bookkeeping must never kill the worker or a command."""
        with self.lock:
            result = change(record)
            snapshot = self.store.snapshot(record)
        try:
            self.store.write(snapshot)
        except Exception as error:  # noqa: BLE001 - any failure to write is reported, never propagated
            note = (f"(job.json could not be written: {type(error).__name__}: {str(error)[:200]}; free disk space "
                    "or fix the folder's permissions — the state shown is kept in memory only)")
            with self.lock:
                if note not in record.message:
                    record.message = f"{record.message} {note}".strip()
            print(f"[comfyui-tdm] TDM job {record.id} '{record.name}': {note}")
        return result

    def set_state(self, record: JobRecord, state: str, message: str | None = None) -> None:
        """Changes a job's state and publishes it: written (or the failure noted), then announced to `wait()` and
        the listener. Never call it with the lock held (it writes)."""

        def change(r: JobRecord) -> None:
            r.state = state
            if message is not None:
                r.message = message

        self.commit_or_note(record, change)
        self.publish(record)

    def write_and_publish(self, record: JobRecord) -> None:
        """Writes a state already changed in memory (under the lock, by the caller) and publishes it."""
        self.commit_or_note(record, lambda r: None)
        self.publish(record)

    def publish(self, record: JobRecord) -> None:
        """Tells `wait()` and the listener the job's current state (after it was written). A job removed meanwhile
        is not announced: its removal event was its last."""
        with self.lock:
            if not self.listed(record):
                return
            self.settled[record.id] = record.state
            self.changed.notify_all()
            payload = record.to_dict(history=False)
        self.emit("tdm.job.state", payload)

    def emit(self, event: str, payload: dict) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event, payload)
        except Exception as error:  # noqa: BLE001 - a broken listener must not fail the job
            print(f"[comfyui-tdm] job event listener failed: {error}")
