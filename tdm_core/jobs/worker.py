"""The worker: one daemon thread that runs queued jobs one at a time, in submission order, and the training loop of
one job (progress, periodic saves and previews, stop requests, failures in words a user can act on).

It works on the jobs' shared state through the `board.JobBoard` (in-memory changes under its lock, record writes
through its commits) and on the job's files through the output writer; it knows nothing of the manager, which only
queues jobs on the board and wakes the worker. It never holds the lock across I/O or while a model moves between
devices, and survives any exception in its own bookkeeping (a full disk while writing job.json): the state is kept in
memory, the reason shown, and the next job runs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

import torch

from .board import JobBoard
from .errors import JobError, NonFiniteLoss
from .outputs import OutputWriter
from .records import MAX_HISTORY, JobRecord
from .session import describe_failure

PERSIST_PROGRESS_EVERY_S = 2.0  # job.json is rewritten at most this often while a job runs (status survives a crash)


class JobWorker:
    """Takes jobs off `board.queue` one at a time and trains them; the thread lives while jobs are queued or the board
    is open."""

    def __init__(self, board: JobBoard, outputs: OutputWriter):
        self.board = board
        self.outputs = outputs
        self.thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        """Starts the thread if it is not running (call under the board's lock)."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="tdm-distill-worker", daemon=True)
            self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                if not self._work_one():
                    return
            except BaseException as error:  # noqa: BLE001 - the worker outlives any failure of its bookkeeping
                print(f"[comfyui-tdm] TDM job worker: {type(error).__name__}: {error}; continuing with the queue")
                time.sleep(0.05)

    def _work_one(self) -> bool:
        """Runs the next queued job; False when the board is closed and the queue is empty."""
        board = self.board
        with board.changed:
            while not board.queue and not board.closed:
                board.changed.wait(1.0)
            if not board.queue:
                return False
            job_id = board.queue.popleft()
            record = board.records[job_id]
            runtime = board.runtimes.get(job_id)
            stop = board.stops[job_id]
            record.started = time.time()
            record.state, record.message = "running", ""
            others = [(other_id, other) for other_id, other in board.runtimes.items() if other_id != job_id]
        board.write_and_publish(record)
        try:
            # Only the job about to run keeps its model on the accelerator.
            for other_id, other in others:
                if hasattr(other, "offload"):
                    try:
                        other.offload()
                    except Exception as error:  # noqa: BLE001 - another job's model stays where it is
                        print(f"[comfyui-tdm] moving TDM job {other_id}'s model off the accelerator failed: {error}")
            with torch.inference_mode(False):
                state, message = self._run(record, runtime, stop)
        except BaseException as error:  # noqa: BLE001 - any failure ends this job, never the worker
            state, message = "failed", describe_failure(error, record.step, record.checkpoint_step)
            print(f"[comfyui-tdm] TDM job {record.id} '{record.name}' failed: {message}")
            with board.lock:
                record.step = record.checkpoint_step
        try:
            if state == "finished":
                # A finished job's teacher is freed; training further needs the workflow (a new runtime).
                with board.lock:
                    board.runtimes.pop(job_id, None)
            elif runtime is not None and hasattr(runtime, "offload"):
                runtime.offload()
        except Exception as error:  # noqa: BLE001 - a failed offload must not leave the job "running"
            message += f" (moving its model off the accelerator failed: {error})"
        finally:
            with board.lock:
                record.eta_s = None
            board.set_state(record, state, message)
            del runtime
            _free_accelerator_memory()
        return True

    def _run(self, record: JobRecord, runtime, stop: threading.Event) -> tuple[str, str]:
        board, outputs = self.board, self.outputs
        if runtime is None:
            raise JobError("the job's teacher model is not in memory; queue the workflow again to resume it")
        outputs.clean_leftovers(record)
        state = outputs.load_checkpoint(record) if record.checkpoint_step else None
        session = runtime.build(state, record.iterations)
        with board.lock:
            record.step = session.step_count
            # steps after the checkpoint were trained again from it: their old loss points are not history
            record.history = [point for point in record.history if point[0] <= session.step_count]
        # Nothing new to save yet: a resume's checkpoint is on disk, and a job stopped before its first step has no
        # step 0 to checkpoint (a record naming step 0 is refused when read back, so the job would be lost).
        last_saved = session.step_count
        last_preview = -1
        window: deque = deque(maxlen=20)
        window.append((time.perf_counter(), session.step_count))
        last_persist = time.monotonic()
        while session.step_count < record.iterations and not stop.is_set():
            metrics = session.step()
            step = session.step_count
            loss_fake, loss_gen = float(metrics.get("loss_fake", 0.0)), float(metrics.get("loss_gen", 0.0))
            if not (math.isfinite(loss_fake) and math.isfinite(loss_gen)):
                raise NonFiniteLoss(f"the loss became non-finite at step {step} (loss_fake {loss_fake}, "
                                    f"loss_gen {loss_gen})")
            window.append((time.perf_counter(), step))
            with board.lock:
                record.step = step
                record.history.append([step, loss_fake, loss_gen])
                if len(record.history) > MAX_HISTORY:
                    record.history = record.history[:-1:2] + record.history[-1:]
                (t0, s0), (t1, s1) = window[0], window[-1]
                record.it_per_s = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
                record.eta_s = (record.iterations - step) / record.it_per_s if record.it_per_s > 0 else None
                progress = {"id": record.id, "name": record.name, "step": step, "iterations": record.iterations,
                            "loss_fake": loss_fake, "loss_gen": loss_gen, "it_per_s": record.it_per_s,
                            "eta_s": record.eta_s}
            board.emit("tdm.job.progress", progress)
            if record.save_every and step % record.save_every == 0:
                outputs.save(record, session)
                last_saved = step
            if record.preview_every and step % record.preview_every == 0:
                self._preview(record, session)
                last_preview = step
            if time.monotonic() - last_persist > PERSIST_PROGRESS_EVERY_S:
                board.commit(record, lambda r: None)
                last_persist = time.monotonic()
        if session.step_count != last_saved:
            outputs.save(record, session)
        if record.preview_every and last_preview != session.step_count:
            self._preview(record, session)
        if session.step_count >= record.iterations:
            return "finished", f"finished {record.iterations} iterations"
        return "stopped", f"stopped at step {session.step_count}; resume continues from there"

    def _preview(self, record: JobRecord, session) -> None:
        image = session.preview()
        if image is None:
            return
        array = self.outputs.write_preview(record, image)
        with self.board.lock:
            self.board.previews[record.id] = array
            record.has_preview = True


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
