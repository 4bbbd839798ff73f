"""The job manager: the commands (submit, resume, stop, remove), the queries (list, get, wait, preview) and the queue.

The state in memory (the records, the queue, the runtimes) lives on a `board.JobBoard`, shared with the worker and
the output writer; its lock is never held across I/O or while a model moves between devices (see `board`). Status
reads, and so the HTTP routes, only ever wait for in-memory work.

Where a caller must know the change is on disk, it is: a new job exists once its record is written (a failed write
leaves nothing), a resume is queued only once its queued state is written, and `wait()` returns a state only after
the write of that state was attempted (a failed write is noted in the record's message, never raised to the worker).
A command checks a job's state and changes it in one hold of the lock, and the reservation that keeps other commands
off a job while its record is written is released in the same hold that enters the result: a submit, stop, resume
or remove racing another never acts on a state that is already gone.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .board import JobBoard
from .errors import JobError
from .outputs import OutputWriter
from .records import (
    ACTIVE_STATES,
    LORA_EXTENSION,
    MAX_EVERY,
    MAX_ITERATIONS,
    MAX_KEEP,
    JobRecord,
    RecordStore,
    checked_int,
    validate_output_name,
)
from .worker import JobWorker


class JobManager:
    """Runs distillation jobs one at a time on a worker thread; see the package docstring."""

    def __init__(self, loras_dir: str | Path, listener: Callable[[str, dict], Any] | None = None):
        self.loras_dir = Path(loras_dir)
        self.store = RecordStore(self.loras_dir)
        self.jobs_dir = self.store.jobs_dir
        self.board = JobBoard(self.store, listener)
        self.outputs = OutputWriter(self.loras_dir, self.board)
        self.worker = JobWorker(self.board, self.outputs)
        self._load_records()

    @property
    def listener(self) -> Callable[[str, dict], Any] | None:
        """The `listener(event, payload)` that job events go to; may be replaced while jobs run."""
        return self.board.listener

    @listener.setter
    def listener(self, listener: Callable[[str, dict], Any] | None) -> None:
        self.board.listener = listener

    def job_dir(self, job_id: str) -> Path:
        return self.store.job_dir(job_id)

    def _load_records(self) -> None:
        board = self.board
        for record in self.store.load():
            was_active = record.state in ACTIVE_STATES
            if was_active:
                was = record.state
                record.state = "stopped"
                record.step = record.checkpoint_step
                record.message = (f"The process ended while this job was {was}; resume continues from "
                                  + (f"the checkpoint at step {record.checkpoint_step}." if record.checkpoint_step
                                     else "the start (no checkpoint had been written)."))
            with board.lock:
                board.records[record.id] = record
                board.settled[record.id] = record.state
            if was_active:
                board.commit_or_note(record, lambda r: None)
            self.outputs.clean_leftovers(record)

    # ---- queries ------------------------------------------------------------------------------------------------
    def list(self) -> list[JobRecord]:
        with self.board.lock:
            return sorted(self.board.records.values(), key=lambda r: r.created)

    def get(self, job: str) -> JobRecord:
        """A job by id, or by output name (the newest job of that name)."""
        with self.board.lock:
            if job in self.board.records:
                return self.board.records[job]
            try:
                name = validate_output_name(job, self.loras_dir)
            except JobError:
                name = None
            found = self.find(name) if name else None
            if found is None:
                raise JobError(f"no TDM job with id or output name {job!r}; known jobs: "
                               + (", ".join(f"{r.id} ({r.name})" for r in self.list()) or "none"), status=404)
            return found

    def find(self, name: str) -> JobRecord | None:
        with self.board.lock:
            matches = [r for r in self.board.records.values() if r.name == name]
            return max(matches, key=lambda r: r.created) if matches else None

    def free_name(self, name: str) -> str:
        """`name_2`, `name_3`, ...: the first output name no job and no file in the LoRA folder uses (offered by
        refusals, so that the fix is one paste)."""
        for number in range(2, 1000):
            candidate = f"{name}_{number}"
            if (self.find(candidate) is None and not (self.loras_dir / (candidate + LORA_EXTENSION)).exists()
                    and not self.outputs.snapshot_files(candidate)):
                return candidate
        return f"{name}_{uuid.uuid4().hex[:8]}"

    def has_runtime(self, job_id: str) -> bool:
        with self.board.lock:
            return job_id in self.board.runtimes

    def preview(self, job_id: str):
        """The latest preview (uint8 H×W×3 numpy array) or None."""
        with self.board.lock:
            cached = self.board.previews.get(job_id)
        return cached if cached is not None else self.outputs.read_preview(job_id)

    def wait(self, job_id: str, timeout: float | None = None, states: tuple = ("stopped", "failed", "finished")):
        """Blocks until the job's written state is one of `states` (default: not active); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        board = self.board
        with board.changed:
            while board.settled.get(job_id, board.records[job_id].state) not in states:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"TDM job {job_id} is still {board.records[job_id].state}")
                board.changed.wait(remaining if remaining is not None else 1.0)
            return board.records[job_id]

    # ---- commands ----------------------------------------------------------------------------------------------
    def submit(self, name: str, runtime, iterations: int, *, save_every: int | None = None,
               keep_last: int | None = None, preview_every: int | None = None, settings: dict | None = None,
               teacher: dict | None = None, if_exists: str = "refuse") -> JobRecord:
        """Queues a new job (or, with if_exists="resume", continues the job of that name, its `settings` and the run
        options given replacing the record's). Returns at once. Run options left out: 100 / 3 / 50 for a new job,
        unchanged on a resume."""
        name = validate_output_name(name, self.loras_dir)
        iterations = checked_int(iterations, "iterations", 1, MAX_ITERATIONS)
        existing = self.find(name)
        if existing is not None:
            if if_exists == "resume":
                check_same_teacher(existing, teacher or {})
                if existing.state == "finished" and int(iterations) <= existing.step:
                    return existing  # nothing left to train: the workflow re-queued after the end
                # how often it saves, keeps and previews may change with the resume, as its iterations may
                return self.resume(existing.id, runtime=runtime, iterations=iterations, settings=settings,
                                   save_every=save_every, keep_last=keep_last, preview_every=preview_every)
            raise JobError(
                f"output name '{name}' is already used by TDM job {existing.id} ({existing.state} at step "
                f"{existing.step}/{existing.iterations}); choose another output name (e.g. "
                f"'{self.free_name(name)}'), or set if_exists to 'resume' to continue that job", status=409)
        save_every = checked_int(100 if save_every is None else save_every, "save_every", 0, MAX_EVERY)
        keep_last = checked_int(3 if keep_last is None else keep_last, "keep_last", 1, MAX_KEEP)
        preview_every = checked_int(50 if preview_every is None else preview_every, "preview_every", 0, MAX_EVERY)
        if (self.loras_dir / (name + LORA_EXTENSION)).exists():
            raise JobError(f"models/loras/{name}{LORA_EXTENSION} already exists and was not written by a TDM "
                           "job here; choose another output name (jobs never overwrite other LoRAs)", status=409)
        foreign = self.outputs.snapshot_files(name)
        if foreign:
            raise JobError(f"models/loras already holds {foreign[0]} (and {len(foreign) - 1} more) named like this "
                           f"job's snapshots, not written by a TDM job here; choose another output name (jobs "
                           "never overwrite or delete other files)", status=409)
        now = time.time()
        record = JobRecord(id=uuid.uuid4().hex[:12], name=name, state="queued", iterations=iterations,
                           created=now, started=None, save_every=save_every, keep_last=keep_last,
                           preview_every=preview_every, settings=dict(settings or {}), teacher=dict(teacher or {}))
        board = self.board
        with board.lock:
            if self.find(name) is not None or name in board.reserved:
                raise JobError(f"output name '{name}' is being used by a TDM job started just now; choose another "
                               "output name", status=409)
            board.reserved.add(name)
            record.message = "queued" + self._waits_for(record)
            snapshot = self.store.snapshot(record)
        try:
            # A job exists once its record is on disk: a failed write (a full disk) leaves no folder and no job.
            self.store.create(snapshot)
        except Exception as error:  # noqa: BLE001 - whatever failed, nothing half-created remains
            with board.lock:
                board.reserved.discard(name)
            raise JobError(f"could not create the job record in {self.job_dir(record.id)}: "
                           f"{type(error).__name__}: {str(error)[:300]}. Free disk space or fix the folder's "
                           "permissions, then start the job again.", status=507) from None
        with board.lock:
            # The name is released in the hold that lists the job: a submit of the same name in between would find
            # neither and start a second job under it.
            board.reserved.discard(name)
            board.records[record.id] = record
            board.runtimes[record.id] = runtime
            self._queue_up(record)
            # Under the lock: the worker takes it to "running" only after this, so no listener ever sees the queued
            # state after the running one (the submitting thread could lose that race once the lock was released).
            board.publish(record)
        return record

    def resume(self, job: str, runtime=None, iterations: int | None = None, settings: dict | None = None, *,
               save_every: int | None = None, keep_last: int | None = None,
               preview_every: int | None = None) -> JobRecord:
        """Continues a stopped/failed job from its newest checkpoint (or a finished one with more iterations).
        An active job is returned as it is. Without `runtime`, the one kept in memory since it ran is used. `settings`
        (the runtime's, as its owner rebuilt them from the record: an older record's in the current shape, this
        run's options) replace the record's, written with the queued state; so do the run options given."""
        if iterations is not None:
            iterations = checked_int(iterations, "iterations", 1, MAX_ITERATIONS)
        run_options = {key: checked_int(value, key, low, MAX_KEEP if key == "keep_last" else MAX_EVERY)
                       for key, value, low in (("save_every", save_every, 0), ("keep_last", keep_last, 1),
                                               ("preview_every", preview_every, 0)) if value is not None}
        board = self.board
        with board.lock:
            record = self.get(job)
            if record.state in ACTIVE_STATES:
                if runtime is not None and record.id not in board.runtimes:
                    board.runtimes[record.id] = runtime
                return record
            if record.id in board.reserved:
                raise JobError(f"TDM job {record.id} '{record.name}' is being resumed already", status=409)
            target = int(iterations) if iterations is not None else record.iterations
            if record.state == "finished" and target <= record.step:
                raise JobError(f"TDM job {record.id} '{record.name}' already finished at step {record.step}; give "
                               f"more iterations (> {record.step}) to train further", status=409)
            if runtime is not None:
                board.runtimes[record.id] = runtime
            if record.id not in board.runtimes:
                raise JobError(
                    f"the teacher model of TDM job {record.id} '{record.name}' is not in memory (a finished job frees "
                    "it, and a ComfyUI restart loses it): queue the distillation workflow again with the same output "
                    f"name and if_exists = resume; it continues from the checkpoint at step {record.checkpoint_step}",
                    status=409)
            # The queued state must be on disk before the job is queued: written from a copy, applied after. While
            # the job is reserved nothing else changes or writes its record (stop and remove refuse it, the worker
            # is done with it), so no older state can land on disk after the copy.
            queued = dataclasses.replace(
                record, state="queued", iterations=max(target, record.checkpoint_step), step=record.checkpoint_step,
                message=f"resuming from step {record.checkpoint_step}" + self._waits_for(record),
                settings=dict(settings) if settings is not None else record.settings, **run_options)
            snapshot = self.store.snapshot(queued)
            board.reserved.add(record.id)
        try:
            self.store.write(snapshot)
        except Exception as error:  # noqa: BLE001
            with board.lock:
                board.reserved.discard(record.id)
            raise JobError(f"could not write the record of TDM job {record.id} '{record.name}': "
                           f"{type(error).__name__}: {str(error)[:300]}. Free disk space or fix the folder's "
                           "permissions, then resume again.", status=507) from None
        with board.lock:
            # Released in the hold that queues the job: a remove in between would see it stopped and take its folder.
            board.reserved.discard(record.id)
            for key in ("state", "iterations", "step", "message", "updated", "settings", *run_options):
                setattr(record, key, getattr(queued, key))
            self._queue_up(record)
            board.publish(record)  # under the lock, before the worker can move it on (see submit)
        return record

    def stop(self, job: str) -> JobRecord:
        """Asks a job to stop: a queued job stops at once; a running one after its current iteration, with a
        checkpoint. Returns the record (wait() for the final state)."""
        board = self.board
        record = self.get(job)

        def request_stop(r: JobRecord) -> Any:
            # Checked and changed in the hold that takes the record's snapshot: a resume or a remove in between
            # cannot see a state that is not the one written.
            if not board.listed(r):
                raise JobError(f"TDM job {r.id} '{r.name}' was removed", status=404)
            if r.state == "queued":
                board.queue.remove(r.id)
                r.state = "stopped"
                r.message = ("stopped before it started" if not r.checkpoint_step
                             else f"stopped while queued; resume continues from step {r.checkpoint_step}")
                return board.runtimes.get(r.id)
            if r.state == "running":
                board.stops[r.id].set()
                r.state = "stopping"
                r.message = "stopping after the current iteration (a checkpoint is written)"
            elif r.state != "stopping":
                raise JobError(f"TDM job {r.id} '{r.name}' is not running (it is {r.state})", status=409)
            return None

        to_offload = board.commit_or_note(record, request_stop)
        board.publish(record)
        # Moving a job's network to the CPU takes seconds: never while holding the lock every status read needs.
        if to_offload is not None and hasattr(to_offload, "offload"):
            to_offload.offload()
        return record

    def remove(self, job: str) -> JobRecord:
        """Forgets a job that is over (finished, failed or stopped): its record, checkpoints and preview are deleted;
        the LoRA files it wrote stay in the LoRA folder, where the user's workflows load them. An active job must be
        stopped first (409). Returns the removed record."""
        with self.board.lock:
            record = self.get(job)
            if record.state in ACTIVE_STATES or record.id in self.board.reserved:
                raise JobError(f"TDM job {record.id} '{record.name}' is {record.state}: stop it before removing it",
                               status=409)
            self.board.forget(record.id)
        # The folder is renamed first (one atomic step, and the record loader skips dot-folders), then deleted: an
        # interrupted deletion never brings the job back half-removed. The store drops writes of the record that come
        # after (a stop or the worker's last write that lost the race to this removal).
        tombstone = self.store.retire(record.id)
        if tombstone is None:
            return record
        shutil.rmtree(tombstone, ignore_errors=True)
        self.board.emit("tdm.job.removed", {"id": record.id, "name": record.name})
        return record

    def close(self, timeout: float = 30.0) -> None:
        """Stops every job and the worker (tests, shutdown)."""
        with self.board.lock:
            self.board.closed = True
            active = [r.id for r in self.board.records.values() if r.state in ("queued", "running")]
            self.board.changed.notify_all()
        for job_id in active:
            try:
                self.stop(job_id)
            except JobError:
                pass  # it ended meanwhile
        self.worker.join(timeout)

    def _waits_for(self, record: JobRecord) -> str:
        """" (waits for job …)" when another job is running or queued ahead of `record` (call under the lock)."""
        records = self.board.records
        ahead = [r for r in records.values() if r.state in ("running", "stopping") and r.id != record.id]
        ahead += [records[i] for i in self.board.queue if i != record.id]
        return f" (waits for job {ahead[0].id} '{ahead[0].name}': one job trains at a time)" if ahead else ""

    def _queue_up(self, record: JobRecord) -> None:
        """Puts a job whose queued state is written on the queue (call under the lock)."""
        record.state = "queued"
        self.board.stops[record.id] = threading.Event()
        self.board.queue.append(record.id)
        self.board.changed.notify_all()
        self.worker.ensure_running()


def check_same_teacher(record: JobRecord, teacher: dict) -> None:
    """Refuses to resume a job with a different teacher than it was started with (when both are described)."""
    old, new = record.teacher or {}, teacher or {}
    for key in ("family", "parametrisation", "parameters", "latent_channels"):
        if key in old and key in new and old[key] != new[key]:
            raise JobError(f"TDM job {record.id} '{record.name}' was started with another teacher ({key} "
                           f"{old[key]!r}, this MODEL has {new[key]!r}); connect the same model to resume it, or "
                           "choose another output name", status=409)
    if "checksum" in old and "checksum" in new:
        a, b = float(old["checksum"]), float(new["checksum"])
        if abs(a - b) > 1e-4 * max(1.0, abs(a), abs(b)):
            raise JobError(f"TDM job {record.id} '{record.name}' was started with different teacher weights "
                           "(weight checksum differs); connect the same model (and LoRAs) to resume it, or choose "
                           "another output name", status=409)
