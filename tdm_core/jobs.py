"""Background distillation jobs: one worker thread, state persisted on disk, atomic outputs, stop and resume.

A job trains one LoRA under a validated output name in a LoRA folder (ComfyUI's `models/loras`):

  <loras>/<name>.safetensors                  the newest student LoRA (replaced atomically at every save)
  <loras>/<name>-step00000200.safetensors     one snapshot per save, the last `keep_last` kept
  <loras>/.tdm_jobs/<job id>/job.json         the job's record: state, progress, losses, settings, messages
  <loras>/.tdm_jobs/<job id>/checkpoints/step-00000200/state.tdmckpt   resumable training state (last `keep_last`)
  <loras>/.tdm_jobs/<job id>/preview.npy      the latest student sample (uint8 H×W×3)

Only the LoRAs carry a model-file extension, so ComfyUI's LoRA lists show them and nothing else (the checkpoint
file is a `torch.save` of `TDMTrainer.state_dict()` under an extension ComfyUI does not list). Every file is
written under a temporary name, fsynced and renamed into place: a crash leaves the previous file or the new one,
never a partial one.

Jobs run one at a time on a single worker thread, in submission order ("queued" until their turn), so two jobs
never interleave. States:

  queued → running → finished          (reached its iterations; the final LoRA is written)
                   → stopping → stopped (stop requested: the current iteration completes, a checkpoint is written)
                   → failed             (an exception: out of memory, a NaN loss, a missing file; the reason is kept)

A stopped or failed job resumes from its newest checkpoint. After a restart the records are read back; a job that
was queued, running or stopping when the process died is marked stopped (it resumes from its last checkpoint).

Ownership: a job writes and deletes only files its record names. The record lists a snapshot (and the latest LoRA)
*before* the file is written, so a crash at any point leaves no file of ours the record does not name; older snapshots
and checkpoints move to the record's `pruning` list, the record is made durable, and only then are they deleted (a
crash in between finishes the deletion at the next load). A file at a name the job is about to write that the record
does not name (another job's LoRA, a user's file) is never overwritten: the job fails and says so. Records read back
from disk are validated field by field (`record_from_disk`); a damaged or planted record is skipped, never trusted.
The worker survives any exception in its own bookkeeping (a full disk while writing job.json): the state is kept in
memory, the reason shown, and the next job runs.

The manager knows nothing about ComfyUI: a job is given a *runtime* (`build(state) -> session`) that creates the
training session on the worker thread, from a checkpoint's state or from scratch. `TDMSession` adapts a
`tdm_core.distill.TDMTrainer`. Events (progress, state changes) go to a `listener(event, payload)` callback.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from . import validation
from .distill.checkpoint import atomic_write_bytes, fsync_dir, safetensors_bytes

JOB_STATES = ("queued", "running", "stopping", "stopped", "failed", "finished")
ACTIVE_STATES = ("queued", "running", "stopping")
JOBS_FOLDER = ".tdm_jobs"
RECORD_FILE = "job.json"
CHECKPOINT_FILE = "state.tdmckpt"
PREVIEW_FILE = "preview.npy"
LORA_EXTENSION = ".safetensors"
MAX_HISTORY = 4000  # loss points kept per job (older ones are thinned out, never the newest)
MAX_ITERATIONS = 1_000_000  # the start node's limit; a request or record above it is refused
MAX_EVERY = 1_000_000
MAX_KEEP = 1000
_JOB_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12]; a fixed pattern on bounded text
MAX_RECORD_BYTES = 16 * 1024 * 1024
_SNAPSHOT_SUFFIX = re.compile(r"-step\d{8}")  # `<name>-step00000200`: reserved for snapshots


class JobError(ValueError):
    """A refused request; the message says why and what to do. `status` is the matching HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite."""


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or infinite values: nothing of that step is written or published."""


class NotOwned(RuntimeError):
    """A file the job was about to write exists and is not one the job's record names."""


# ---------------------------------------------------------------------------------------------------------------
# Output names


def validate_output_name(name: str, loras_dir: str | Path) -> str:
    """The LoRA name a job may write (without extension), or a JobError.

    Allowed: letters, digits, space, `_ . + -`, and sub-folders separated by `/` ("tdm/cat_v2"). Refused: empty
    names, absolute paths, drive letters, backslashes, `.`/`..` parts, hidden names, Windows device names (CON, NUL,
    COM1, LPT1, ...), parts ending in a dot or space, names ending in `-stepNNNNNNNN` (the snapshots' names: a job
    named so would collide with another job's snapshot), and anything that would resolve (through symlinks too)
    outside the LoRA folder.
    """
    if not isinstance(name, str):
        raise JobError(f"output name must be text, got {type(name).__name__}")
    cleaned = name.strip()
    if cleaned.lower().endswith(LORA_EXTENSION):
        cleaned = cleaned[: -len(LORA_EXTENSION)]
    if not cleaned:
        raise JobError("output name is empty: give the LoRA a name such as 'tdm_my_model'")
    try:
        validation.relative_name(cleaned, f"output name {name!r}:" if len(name) < 120 else "output name")
        if _SNAPSHOT_SUFFIX.fullmatch(cleaned[-13:]):
            raise validation.ValidationError(
                f"output name {name!r} ends like a snapshot (-stepNNNNNNNN), a name jobs give their numbered "
                "snapshots; choose a name without that ending")
        validation.confined(loras_dir, cleaned + LORA_EXTENSION, f"output name {name!r}")
    except validation.ValidationError as error:
        text = str(error)
        if not text.startswith("output name"):
            text = "output name " + text
        raise JobError(text + " (give a name relative to models/loras such as 'tdm_my_model' or 'tdm/my_model')"
                       ) from None
    return cleaned


def snapshot_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}{LORA_EXTENSION}"


def _is_snapshot_of(name: str, file_name: str) -> bool:
    """Whether `file_name` is a snapshot name of job output `name` (a prefix, 8 digits, the extension)."""
    head, tail = name + "-step", file_name[len(name) + 5:]
    return (file_name.startswith(head) and tail.endswith(LORA_EXTENSION)
            and len(tail) == 8 + len(LORA_EXTENSION) and tail[:8].isdigit() and tail[:8].isascii())


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class JobRecord:
    """What is known about a job; persisted as job.json (so listing and resuming survive a restart)."""

    id: str
    name: str
    state: str
    iterations: int
    step: int = 0
    checkpoint_step: int = 0  # the step of the newest checkpoint on disk (0: none yet)
    message: str = ""
    created: float = 0.0
    updated: float = 0.0
    started: float | None = None
    save_every: int = 100
    keep_last: int = 3
    preview_every: int = 50
    settings: dict = field(default_factory=dict)  # the job's settings, for display and resume checks
    teacher: dict = field(default_factory=dict)  # a description/fingerprint of the teacher it was started with
    history: list = field(default_factory=list)  # [step, loss_fake, loss_gen]
    it_per_s: float = 0.0
    eta_s: float | None = None
    loras: list = field(default_factory=list)  # snapshot files (relative to the LoRA folder), oldest first
    latest_lora: str = ""  # relative to the LoRA folder
    has_preview: bool = False
    checkpoints: list = field(default_factory=list)  # steps of the checkpoint folders this job wrote, oldest first
    pruning: list = field(default_factory=list)  # snapshot files no longer kept, deleted after the record is durable
    pruning_checkpoints: list = field(default_factory=list)  # likewise for checkpoint steps

    def to_dict(self, history: bool = True) -> dict:
        data = asdict(self)
        if not history:
            data.pop("history")
        data["progress"] = self.progress_text()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        """A record from trusted data (this process's own); records read from disk go through `record_from_disk`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def owns(self, file_name: str) -> bool:
        """Whether the record names `file_name` (relative to the LoRA folder) as a file this job wrote or writes."""
        return file_name == self.latest_lora or file_name in self.loras or file_name in self.pruning

    def progress_text(self) -> str:
        line = f"TDM job {self.id} '{self.name}': {self.state}, step {self.step}/{self.iterations}"
        if self.history:
            _, fake, gen = self.history[-1]
            line += f", loss_fake {fake:.4g}, loss_gen {gen:.4g}"
        if self.state == "running" and self.it_per_s > 0:
            line += f", {self.it_per_s:.2f} it/s"
            if self.eta_s is not None:
                line += f", ETA {_duration(self.eta_s)}"
        if self.latest_lora:
            line += f"\nLoRA: {self.latest_lora} (checkpoint at step {self.checkpoint_step})"
        if self.message:
            line += f"\n{self.message}"
        return line


def record_from_disk(data, folder_id: str, loras_dir: str | Path) -> JobRecord:
    """A job record read back from job.json, every field checked (type, range, finite, names confined to the LoRA
    folder and owned by this job's name); a ValidationError says which field is wrong. A record is data on disk that
    anyone with access to models/loras can edit: its id and file names decide what is written and deleted."""
    data = validation.json_object(data, "the record")
    job_id = data.get("id")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id) or job_id != folder_id:
        raise validation.ValidationError(f"id {str(job_id)[:40]!r} is not this folder's job id {folder_id!r}")
    try:
        name = validate_output_name(data.get("name"), loras_dir)
    except JobError as error:
        raise validation.ValidationError(f"name: {error}") from None
    if data.get("name") != name:
        raise validation.ValidationError(f"name {str(data.get('name'))[:120]!r} is not in its canonical form")
    state = data.get("state")
    if state not in JOB_STATES:
        raise validation.ValidationError(f"state {str(state)[:40]!r} is not one of {', '.join(JOB_STATES)}")

    def integer(key, lo, hi, default=None):
        value = data.get(key, default)
        return validation.number(value, key, lo=lo, hi=hi, integer=True)

    def real(key, default=0.0, optional=False):
        value = data.get(key, default)
        if value is None and optional:
            return None
        return validation.number(value, key, lo=0.0)

    iterations = integer("iterations", 1, MAX_ITERATIONS)
    step = integer("step", 0, MAX_ITERATIONS, 0)
    checkpoint_step = integer("checkpoint_step", 0, MAX_ITERATIONS, 0)
    history = data.get("history", [])
    if not isinstance(history, list) or len(history) > 2 * MAX_HISTORY:
        raise validation.ValidationError("history must be a list of at most "
                                         f"{2 * MAX_HISTORY} [step, loss_fake, loss_gen] points")
    points = []
    for point in history:
        if not isinstance(point, list) or len(point) != 3:
            raise validation.ValidationError("history points must be [step, loss_fake, loss_gen]")
        points.append([validation.number(point[0], "history step", lo=0, hi=MAX_ITERATIONS, integer=True),
                       validation.number(point[1], "history loss"), validation.number(point[2], "history loss")])

    def files(key):
        value = data.get(key, [])
        if not isinstance(value, list) or len(value) > MAX_KEEP + 1:
            raise validation.ValidationError(f"{key} must be a list of this job's snapshot names")
        for item in value:
            if not isinstance(item, str) or not _is_snapshot_of(name, item):
                raise validation.ValidationError(f"{key} names {str(item)[:120]!r}, not a snapshot of '{name}'")
            validation.confined(loras_dir, item, key)
        return list(value)

    def steps(key, default):
        value = data.get(key, default)
        if not isinstance(value, list) or len(value) > MAX_KEEP + 1:
            raise validation.ValidationError(f"{key} must be a list of steps")
        return [validation.number(v, key, lo=1, hi=MAX_ITERATIONS, integer=True) for v in value]

    latest = data.get("latest_lora", "")
    if latest not in ("", name + LORA_EXTENSION):
        raise validation.ValidationError(f"latest_lora {str(latest)[:120]!r} is not '{name}{LORA_EXTENSION}'")
    message = data.get("message", "")
    if not isinstance(message, str):
        raise validation.ValidationError("message must be text")
    for key in ("settings", "teacher"):
        validation.json_object(data.get(key, {}), key)
    has_preview = data.get("has_preview", False)
    if not isinstance(has_preview, bool):
        raise validation.ValidationError("has_preview must be true or false")
    return JobRecord(
        id=job_id, name=name, state=state, iterations=iterations, step=min(step, iterations),
        checkpoint_step=checkpoint_step, message=message[:4000], created=real("created"), updated=real("updated"),
        started=real("started", None, optional=True), save_every=integer("save_every", 0, MAX_EVERY, 100),
        keep_last=integer("keep_last", 1, MAX_KEEP, 3), preview_every=integer("preview_every", 0, MAX_EVERY, 50),
        settings=dict(data.get("settings", {})), teacher=dict(data.get("teacher", {})), history=points,
        it_per_s=real("it_per_s"), eta_s=real("eta_s", None, optional=True), loras=files("loras"),
        latest_lora=latest, has_preview=has_preview,
        # records written before checkpoints were listed: the one named by checkpoint_step is this job's
        checkpoints=steps("checkpoints", [checkpoint_step] if checkpoint_step else []),
        pruning=files("pruning"), pruning_checkpoints=steps("pruning_checkpoints", []))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# Sessions and runtimes


class TrainingSession(Protocol):
    """One live training run (created on the worker thread)."""

    step_count: int

    def step(self) -> dict: ...  # one iteration; returns metrics with "loss_fake" and "loss_gen"

    def state_dict(self) -> dict: ...  # resumable state (torch.save-able with weights_only loading)

    def lora(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...  # the student LoRA file's content

    def preview(self) -> Any: ...  # uint8 H×W×3 array/tensor, or None


class JobRuntime(Protocol):
    """What a job needs to (re)start: builds its session on the worker thread, from a checkpoint state (resume)
    or from scratch (None). May define `offload()` to free accelerator memory while the job waits."""

    def build(self, state: dict | None) -> TrainingSession: ...


class TDMSession:
    """A `tdm_core.distill.TDMTrainer` as a job's session; `preview_decode(x0) -> uint8 H×W×3` renders samples."""

    def __init__(self, trainer, preview_prompts: list[str] | None = None,
                 preview_decode: Callable | None = None, extra_metadata: dict | None = None):
        self.trainer = trainer
        self.preview_prompts = list(preview_prompts or trainer.config.prompts[:4])
        self.preview_decode = preview_decode
        self.extra_metadata = dict(extra_metadata or {})

    @classmethod
    def create(cls, backend, config, state: dict | None = None, iterations: int | None = None, **kwargs):
        """A new trainer, or one continuing `state` (its stored config; `iterations` may be raised)."""
        from .distill import DistillConfig, TDMTrainer

        if state is not None:
            config = DistillConfig.from_dict(state["config"])
        if iterations is not None:
            config.iterations = int(iterations)
        trainer = TDMTrainer(backend, config)
        if state is not None:
            # The trainer's state holds only its own generator: the process-wide RNG belongs to whatever else runs in
            # this process (ComfyUI's samplers) and is neither read nor rewound.
            trainer.load_state_dict(state)
        return cls(trainer, **kwargs)

    @property
    def step_count(self) -> int:
        return self.trainer.step_count

    def step(self) -> dict:
        return self.trainer.step()

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def lora(self):
        from .distill.checkpoint import student_lora

        tensors, metadata = student_lora(self.trainer)
        return tensors, {**metadata, **self.extra_metadata}

    def preview(self):
        if self.preview_decode is None or not self.preview_prompts:
            return None
        x0 = self.trainer.sample(self.preview_prompts, seed=0)
        return self.preview_decode(x0)


def describe_failure(error: BaseException, step: int, checkpoint_step: int) -> str:
    """The reason a job failed, in words a user can act on."""
    resume = (f"resume continues from the checkpoint at step {checkpoint_step}" if checkpoint_step
              else "no checkpoint was written yet; resuming starts over")
    text = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return (f"out of memory at step {step}: {text}. Lower batch_size or the resolution, enable "
                f"gradient_checkpointing, use dtype bfloat16, or free VRAM (offload: unload_comfy_models); {resume}.")
    if isinstance(error, NonFiniteWeights):
        return (f"{text}. Lower the learning rate, check the teacher, or use dtype float32/bfloat16; {resume}.")
    if isinstance(error, NotOwned):
        return f"{text}; {resume}."
    if isinstance(error, NonFiniteLoss):
        return (f"{text}. Lower the learning rate, check the teacher (a broken merge or LoRA gives NaN), or use "
                f"dtype float32/bfloat16 instead of float16; {resume}.")
    if isinstance(error, FileNotFoundError):
        return f"a file is missing: {text}; {resume}."
    return f"{type(error).__name__} at step {step}: {text}; {resume}."


# ---------------------------------------------------------------------------------------------------------------
# The manager


class JobManager:
    """Runs distillation jobs one at a time on a worker thread; see the module docstring."""

    def __init__(self, loras_dir: str | Path, listener: Callable[[str, dict], Any] | None = None):
        self.loras_dir = Path(loras_dir)
        self.jobs_dir = self.loras_dir / JOBS_FOLDER
        self.listener = listener
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._records: dict[str, JobRecord] = {}
        self._runtimes: dict[str, Any] = {}
        self._stops: dict[str, threading.Event] = {}
        self._queue: deque[str] = deque()
        self._previews: dict[str, Any] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self._load_records()

    # ---- persistence -----------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _load_records(self) -> None:
        try:
            folders = sorted(p for p in self.jobs_dir.iterdir() if p.is_dir()) if self.jobs_dir.is_dir() else []
        except OSError as error:
            print(f"[comfyui-tdm] cannot list the job records in {self.jobs_dir}: {error}")
            return
        for folder in folders:
            path = folder / RECORD_FILE
            if not path.is_file():
                continue
            try:
                if path.stat().st_size > MAX_RECORD_BYTES:
                    raise validation.ValidationError(f"it is larger than {MAX_RECORD_BYTES} bytes")
                record = record_from_disk(validation.loads_json(path.read_bytes(), "job.json"), folder.name,
                                          self.loras_dir)
            except (OSError, ValueError) as error:
                # A damaged or planted record must not take the others (or the server) down with it, and is never
                # acted on: its id and file names would decide what is written and deleted.
                print(f"[comfyui-tdm] skipping job record {path}: {error}. Fix or remove that folder.")
                continue
            if record.state in ACTIVE_STATES:
                was = record.state
                record.state = "stopped"
                record.step = record.checkpoint_step
                record.message = (f"The process ended while this job was {was}; resume continues from "
                                  + (f"the checkpoint at step {record.checkpoint_step}." if record.checkpoint_step
                                     else "the start (no checkpoint had been written)."))
                self._persist_or_note(record)
            self._records[record.id] = record
            self._clean_leftovers(record)

    def _persist(self, record: JobRecord) -> None:
        record.updated = time.time()
        data = json.dumps(_json_safe(record.to_dict()), indent=1, allow_nan=False).encode("utf-8")
        atomic_write_bytes(self.job_dir(record.id) / RECORD_FILE, data)

    def _persist_or_note(self, record: JobRecord) -> bool:
        """Persists the record; on failure (a full disk, a read-only folder) keeps the state in memory and says so in
        the record's message instead of raising: bookkeeping must never kill the worker or a status read."""
        try:
            self._persist(record)
            return True
        except Exception as error:  # noqa: BLE001 - any failure to write is reported, never propagated
            note = (f"(job.json could not be written: {type(error).__name__}: {str(error)[:200]}; free disk space "
                    "or fix the folder's permissions — the state shown is kept in memory only)")
            if note not in record.message:
                record.message = f"{record.message} {note}".strip()
            print(f"[comfyui-tdm] TDM job {record.id} '{record.name}': {note}")
            return False

    def _emit(self, event: str, payload: dict) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event, payload)
        except Exception as error:  # noqa: BLE001 - a broken listener must not fail the job
            print(f"[comfyui-tdm] job event listener failed: {error}")

    def _set_state(self, record: JobRecord, state: str, message: str | None = None) -> None:
        """Changes a job's state; a failure to persist it is noted in the record, never raised (the worker calls
        this outside any job's try, and the state in memory is what the queue runs on)."""
        with self._lock:
            record.state = state
            if message is not None:
                record.message = message
            self._persist_or_note(record)
            self._wake.notify_all()
        self._emit("tdm.job.state", record.to_dict(history=False))

    # ---- queries ------------------------------------------------------------------------------------------------
    def list(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created)

    def get(self, job: str) -> JobRecord:
        """A job by id, or by output name (the newest job of that name)."""
        with self._lock:
            if job in self._records:
                return self._records[job]
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
        with self._lock:
            matches = [r for r in self._records.values() if r.name == name]
            return max(matches, key=lambda r: r.created) if matches else None

    def has_runtime(self, job_id: str) -> bool:
        return job_id in self._runtimes

    def preview(self, job_id: str):
        """The latest preview (uint8 H×W×3 numpy array) or None."""
        with self._lock:
            cached = self._previews.get(job_id)
        if cached is not None:
            return cached
        path = self.job_dir(job_id) / PREVIEW_FILE
        if not path.is_file():
            return None
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            # a preview is ours only if it has the shape and type _preview writes; anything else is not shown
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or max(array.shape) > 8192:
                raise ValueError(f"shape {array.shape} of {array.dtype} is not an RGB preview")
            return np.array(array)
        except (OSError, ValueError) as error:
            print(f"[comfyui-tdm] ignoring the preview {path}: {error}")
            return None

    def wait(self, job_id: str, timeout: float | None = None, states: tuple = ("stopped", "failed", "finished")):
        """Blocks until the job is in one of `states` (default: not active); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._records[job_id].state not in states:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"TDM job {job_id} is still {self._records[job_id].state}")
                self._wake.wait(remaining if remaining is not None else 1.0)
            return self._records[job_id]

    # ---- commands ----------------------------------------------------------------------------------------------
    def submit(self, name: str, runtime, iterations: int, *, save_every: int = 100, keep_last: int = 3,
               preview_every: int = 50, settings: dict | None = None, teacher: dict | None = None,
               if_exists: str = "refuse") -> JobRecord:
        """Queues a new job (or, with if_exists="resume", continues the job of that name). Returns at once."""
        name = validate_output_name(name, self.loras_dir)
        iterations = _checked_int(iterations, "iterations", 1, MAX_ITERATIONS)
        save_every = _checked_int(save_every, "save_every", 0, MAX_EVERY)
        keep_last = _checked_int(keep_last, "keep_last", 1, MAX_KEEP)
        preview_every = _checked_int(preview_every, "preview_every", 0, MAX_EVERY)
        with self._lock:
            existing = self.find(name)
            if existing is not None:
                if if_exists == "resume":
                    check_same_teacher(existing, teacher or {})
                    if existing.state == "finished" and int(iterations) <= existing.step:
                        return existing  # nothing left to train: the workflow re-queued after the end
                    return self.resume(existing.id, runtime=runtime, iterations=iterations)
                raise JobError(
                    f"output name '{name}' is already used by TDM job {existing.id} ({existing.state} at step "
                    f"{existing.step}/{existing.iterations}); choose another output name, or set if_exists to "
                    "'resume' to continue that job", status=409)
            if (self.loras_dir / (name + LORA_EXTENSION)).exists():
                raise JobError(f"models/loras/{name}{LORA_EXTENSION} already exists and was not written by a TDM "
                               "job here; choose another output name (jobs never overwrite other LoRAs)", status=409)
            foreign = self._snapshot_files(name)
            if foreign:
                raise JobError(f"models/loras already holds {foreign[0]} (and {len(foreign) - 1} more) named like this "
                               f"job's snapshots, not written by a TDM job here; choose another output name (jobs "
                               "never overwrite or delete other files)", status=409)
            now = time.time()
            record = JobRecord(id=uuid.uuid4().hex[:12], name=name, state="queued", iterations=iterations,
                               created=now, started=None, save_every=save_every, keep_last=keep_last,
                               preview_every=preview_every, settings=dict(settings or {}),
                               teacher=dict(teacher or {}))
            # A job exists once its record is on disk: a failed write (a full disk) leaves no folder and no job.
            try:
                self.job_dir(record.id).mkdir(parents=True, exist_ok=False)
                self._persist(record)
            except Exception as error:  # noqa: BLE001 - whatever failed, nothing half-created remains
                shutil.rmtree(self.job_dir(record.id), ignore_errors=True)
                raise JobError(f"could not create the job record in {self.job_dir(record.id)}: "
                               f"{type(error).__name__}: {str(error)[:300]}. Free disk space or fix the folder's "
                               "permissions, then start the job again.", status=507) from None
            self._records[record.id] = record
            self._runtimes[record.id] = runtime
            self._enqueue(record, "queued")
            return record

    def _snapshot_files(self, name: str) -> list[str]:
        """Files in the LoRA folder named like snapshots of job output `name` (compared as text, no pattern)."""
        folder = (self.loras_dir / name).parent
        base = name.rsplit("/", 1)[-1]
        try:
            entries = sorted(os.listdir(folder)) if folder.is_dir() else []
        except OSError:
            return []
        prefix = name[: len(name) - len(base)]
        return [prefix + entry for entry in entries if _is_snapshot_of(base, entry)]

    def resume(self, job: str, runtime=None, iterations: int | None = None) -> JobRecord:
        """Continues a stopped/failed job from its newest checkpoint (or a finished one with more iterations).
        An active job is returned as it is. Without `runtime`, the one kept in memory since it ran is used."""
        with self._lock:
            record = self.get(job)
            if iterations is not None:
                iterations = _checked_int(iterations, "iterations", 1, MAX_ITERATIONS)
            if record.state in ACTIVE_STATES:
                if runtime is not None and record.id not in self._runtimes:
                    self._runtimes[record.id] = runtime
                return record
            target = int(iterations) if iterations is not None else record.iterations
            if record.state == "finished" and target <= record.step:
                raise JobError(f"TDM job {record.id} '{record.name}' already finished at step {record.step}; give "
                               f"more iterations (> {record.step}) to train further", status=409)
            if runtime is not None:
                self._runtimes[record.id] = runtime
            if record.id not in self._runtimes:
                raise JobError(
                    f"the teacher model of TDM job {record.id} '{record.name}' is not in memory (a finished job frees it, "
                    "and a ComfyUI restart loses it): queue the distillation workflow again with the same output name and if_exists "
                    "= resume; it continues from the checkpoint at step "
                    f"{record.checkpoint_step}", status=409)
            before = (record.iterations, record.step, record.state, record.message)
            record.iterations = max(target, record.checkpoint_step)
            record.step = record.checkpoint_step
            try:
                self._enqueue(record, f"resuming from step {record.checkpoint_step}", durable=True)
            except JobError:
                record.iterations, record.step, record.state, record.message = before
                raise
            return record

    def stop(self, job: str) -> JobRecord:
        """Asks a job to stop: a queued job stops at once; a running one after its current iteration, with a
        checkpoint. Returns the record (wait() for the final state)."""
        to_offload = None
        with self._lock:
            record = self.get(job)
            if record.state == "queued":
                self._queue.remove(record.id)
                to_offload = self._runtimes.get(record.id)
                self._set_state(record, "stopped", "stopped before it started" if not record.checkpoint_step
                                else f"stopped while queued; resume continues from step {record.checkpoint_step}")
            elif record.state == "running":
                self._stops[record.id].set()
                self._set_state(record, "stopping", "stopping after the current iteration (a checkpoint is written)")
            elif record.state == "stopping":
                pass
            else:
                raise JobError(f"TDM job {record.id} '{record.name}' is not running (it is {record.state})",
                               status=409)
        # Moving a teacher copy to the CPU takes seconds: never while holding the lock every status read needs.
        if to_offload is not None and hasattr(to_offload, "offload"):
            to_offload.offload()
        return record

    def close(self, timeout: float = 30.0) -> None:
        """Stops every job and the worker (tests, shutdown)."""
        with self._lock:
            self._closed = True
            for job_id in list(self._queue):
                self.stop(job_id)
            for record in self._records.values():
                if record.state == "running":
                    self.stop(record.id)
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _enqueue(self, record: JobRecord, message: str, durable: bool = False) -> None:
        """Queues a job. durable=True: the queued state must reach disk first (a resume), else JobError and the
        job is not queued."""
        ahead = [r for r in self._records.values() if r.state in ("running", "stopping") and r.id != record.id]
        ahead += [self._records[i] for i in self._queue if i != record.id]
        if ahead:
            message += f" (waits for job {ahead[0].id} '{ahead[0].name}': one job trains at a time)"
        if durable:
            record.state, record.message = "queued", message
            try:
                self._persist(record)
            except Exception as error:  # noqa: BLE001
                raise JobError(f"could not write the record of TDM job {record.id} '{record.name}': "
                               f"{type(error).__name__}: {str(error)[:300]}. Free disk space or fix the folder's "
                               "permissions, then resume again.", status=507) from None
        self._stops[record.id] = threading.Event()
        self._queue.append(record.id)
        self._set_state(record, "queued", message)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="tdm-distill-worker", daemon=True)
            self._worker.start()

    # ---- the worker ----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                if not self._work_one():
                    return
            except BaseException as error:  # noqa: BLE001 - the worker outlives any failure of its bookkeeping
                print(f"[comfyui-tdm] TDM job worker: {type(error).__name__}: {error}; continuing with the queue")
                time.sleep(0.05)

    def _work_one(self) -> bool:
        """Runs the next queued job; False when the manager is closed and the queue is empty."""
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait(1.0)
            if not self._queue:
                return False
            job_id = self._queue.popleft()
            record = self._records[job_id]
            runtime = self._runtimes.get(job_id)
            record.started = time.time()
            self._set_state(record, "running", "")
        try:
            # Only the job about to run keeps its model on the accelerator.
            for other_id, other in list(self._runtimes.items()):
                if other_id != job_id and hasattr(other, "offload"):
                    try:
                        other.offload()
                    except Exception as error:  # noqa: BLE001 - another job's model stays where it is
                        print(f"[comfyui-tdm] moving TDM job {other_id}'s model off the accelerator failed: {error}")
            with torch.inference_mode(False):
                state, message = self._run(record, runtime)
        except BaseException as error:  # noqa: BLE001 - any failure ends this job, never the worker
            state, message = "failed", describe_failure(error, record.step, record.checkpoint_step)
            print(f"[comfyui-tdm] TDM job {record.id} '{record.name}' failed: {message}")
            record.step = record.checkpoint_step
        try:
            with self._lock:
                if state == "finished":
                    # A finished job's teacher copy is freed; training further needs the workflow (a new copy).
                    self._runtimes.pop(job_id, None)
                elif runtime is not None and hasattr(runtime, "offload"):
                    runtime.offload()
        except Exception as error:  # noqa: BLE001 - a failed offload must not leave the job "running"
            message += f" (moving its model off the accelerator failed: {error})"
        finally:
            record.eta_s = None
            self._set_state(record, state, message)
            del runtime
            _free_accelerator_memory()
        return True

    def _run(self, record: JobRecord, runtime) -> tuple[str, str]:
        if runtime is None:
            raise JobError("the job's teacher model is not in memory; queue the workflow again to resume it")
        stop = self._stops[record.id]
        self._clean_leftovers(record)
        state = self._load_checkpoint(record) if record.checkpoint_step else None
        session = runtime.build(state)
        with self._lock:
            record.step = session.step_count
            # steps after the checkpoint were trained again from it: their old loss points are not history
            record.history = [point for point in record.history if point[0] <= session.step_count]
        last_saved = session.step_count if state is not None else -1
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
            with self._lock:
                record.step = step
                record.history.append([step, loss_fake, loss_gen])
                if len(record.history) > MAX_HISTORY:
                    record.history = record.history[:-1:2] + record.history[-1:]
                (t0, s0), (t1, s1) = window[0], window[-1]
                record.it_per_s = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
                record.eta_s = (record.iterations - step) / record.it_per_s if record.it_per_s > 0 else None
            self._emit("tdm.job.progress", {"id": record.id, "name": record.name, "step": step,
                                            "iterations": record.iterations, "loss_fake": loss_fake,
                                            "loss_gen": loss_gen, "it_per_s": record.it_per_s,
                                            "eta_s": record.eta_s})
            if record.save_every and step % record.save_every == 0:
                self._save(record, session)
                last_saved = step
            if record.preview_every and step % record.preview_every == 0:
                self._preview(record, session)
                last_preview = step
            if time.monotonic() - last_persist > 2.0:
                with self._lock:
                    self._persist(record)
                last_persist = time.monotonic()
        if session.step_count != last_saved:
            self._save(record, session)
        if record.preview_every and last_preview != session.step_count:
            self._preview(record, session)
        if session.step_count >= record.iterations:
            return "finished", f"finished {record.iterations} iterations"
        return "stopped", f"stopped at step {session.step_count}; resume continues from there"

    # ---- outputs ---------------------------------------------------------------------------------------------------
    def _checkpoint_dir(self, record: JobRecord, step: int) -> Path:
        return self.job_dir(record.id) / "checkpoints" / f"step-{step:08d}"

    def _load_checkpoint(self, record: JobRecord) -> dict:
        path = self._checkpoint_dir(record, record.checkpoint_step) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"the checkpoint of step {record.checkpoint_step} ({path}) is gone")
        from .lora.files import check_torch_archive

        check_torch_archive(path)  # a replaced checkpoint must not inflate: sizes are checked before torch.load
        return torch.load(path, map_location="cpu", weights_only=True)

    def _lora_path(self, file_name: str) -> Path:
        """An owned LoRA file's path, confined to the LoRA folder (symlinks resolved) once more before any write or
        delete: the folder may have changed since the record was validated."""
        try:
            validation.confined(self.loras_dir, file_name, "LoRA file")
        except validation.ValidationError as error:
            raise NotOwned(f"refusing to touch {file_name!r}: {error}") from None
        return self.loras_dir / file_name

    def _save(self, record: JobRecord, session) -> None:
        """The checkpoint, then the LoRA snapshot and the latest LoRA; each atomic. Nothing is written when the
        weights are non-finite (the last good files stay published), and nothing is overwritten that the record does
        not name. Older snapshots and checkpoints are deleted only after the record that drops them is durable."""
        step = session.step_count
        tensors, metadata = session.lora()
        bad = validation.non_finite_tensors(tensors)
        state = session.state_dict()
        bad += [f"state {name}" for name in validation.non_finite_tensors(state)]
        if bad:
            kept = (f"the LoRA and checkpoint of step {record.checkpoint_step} are kept" if record.checkpoint_step
                    else "no LoRA had been written yet")
            raise NonFiniteWeights(f"the student weights hold NaN or infinite values at step {step} ("
                                   f"{', '.join(bad[:3])}); nothing of this step was written, {kept}")
        snapshot, latest = snapshot_name(record.name, step), record.name + LORA_EXTENSION
        for file_name in (snapshot, latest):
            if self._lora_path(file_name).exists() and not record.owns(file_name):
                raise NotOwned(f"models/loras/{file_name} exists and was not written by this job (another job's "
                               "LoRA or your file); it was left untouched. Move it away, or start the job under "
                               "another output name")
        root = self.job_dir(record.id) / "checkpoints"
        final = self._checkpoint_dir(record, step)
        if not final.exists():
            buffer = io.BytesIO()
            torch.save(state, buffer)
            tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                atomic_write_bytes(tmp / CHECKPOINT_FILE, buffer.getvalue())
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(root)
        data = safetensors_bytes(tensors, {**metadata, "tdm.job_id": record.id, "tdm.job_name": record.name,
                                           "tdm.trained_iterations": str(step)})
        with self._lock:
            # Write-ahead: the record names the files before they exist, so a crash after writing one never leaves a
            # file of ours that the record does not own (and a resume may overwrite it).
            if step not in record.checkpoints:
                record.checkpoints.append(step)
            if snapshot not in record.loras:
                record.loras.append(snapshot)
            record.pruning = [f for f in record.pruning if f != snapshot]
            record.latest_lora = latest
            self._persist(record)
        atomic_write_bytes(self._lora_path(snapshot), data)
        atomic_write_bytes(self._lora_path(latest), data)
        with self._lock:
            record.checkpoint_step = step
            drop = record.loras[: -record.keep_last]
            record.loras = record.loras[-record.keep_last:]
            record.pruning += [f for f in drop if f not in record.pruning]
            record.checkpoints.sort()
            drop_steps = [s for s in record.checkpoints[: -record.keep_last] if s != step]
            record.checkpoints = [s for s in record.checkpoints if s not in drop_steps]
            record.pruning_checkpoints += [s for s in drop_steps if s not in record.pruning_checkpoints]
            self._persist(record)  # durable before anything it drops is deleted
        self._prune(record)
        self._emit("tdm.job.saved", {"id": record.id, "name": record.name, "step": step,
                                     "lora": record.latest_lora, "snapshot": snapshot})

    def _prune(self, record: JobRecord) -> None:
        """Deletes what the durable record lists under pruning (only files it names; each confined again)."""
        with self._lock:
            files, steps = list(record.pruning), list(record.pruning_checkpoints)
        if not files and not steps:
            return
        for file_name in files:
            if file_name in record.loras or file_name == record.latest_lora:
                continue  # kept again since (a resume saved that step anew)
            try:
                self._lora_path(file_name).unlink(missing_ok=True)
            except (OSError, NotOwned) as error:
                print(f"[comfyui-tdm] TDM job {record.id}: could not delete {file_name}: {error}")
                return
        for step in steps:
            if step in record.checkpoints or step == record.checkpoint_step:
                continue
            shutil.rmtree(self._checkpoint_dir(record, step), ignore_errors=True)
        with self._lock:
            record.pruning = [f for f in record.pruning if f not in files]
            record.pruning_checkpoints = [s for s in record.pruning_checkpoints if s not in steps]
            self._persist_or_note(record)

    def _clean_leftovers(self, record: JobRecord) -> None:
        """What a crash can leave: temporary files of this job's own writes (`.<file>.<pid>.<thread>.partial` next
        to each file the record names, temporary checkpoint folders in the job's folder) and deletions the record
        had made durable but not done. Only names derived from the record are touched."""
        try:
            owned = {record.latest_lora, *record.loras, *record.pruning} - {""}
            folders: dict[Path, set[str]] = {}
            for file_name in owned:
                path = self._lora_path(file_name)
                folders.setdefault(path.parent, set()).add("." + path.name + ".")
            for folder, prefixes in folders.items():
                if folder.is_dir():
                    for entry in os.listdir(folder):
                        if entry.endswith(".partial") and any(entry.startswith(p) for p in prefixes):
                            (folder / entry).unlink(missing_ok=True)
            own = self.job_dir(record.id)
            for folder in (own, own / "checkpoints", *[own / "checkpoints" / f"step-{s:08d}"
                                                        for s in record.checkpoints]):
                if not folder.is_dir():
                    continue
                for entry in os.listdir(folder):
                    if entry.startswith(".tmp-step-") and (folder / entry).is_dir():
                        shutil.rmtree(folder / entry, ignore_errors=True)
                    elif entry.startswith(".") and entry.endswith(".partial"):
                        (folder / entry).unlink(missing_ok=True)
            self._prune(record)
        except (OSError, NotOwned) as error:
            print(f"[comfyui-tdm] TDM job {record.id}: cleaning crash leftovers failed: {error}")

    def _preview(self, record: JobRecord, session) -> None:
        image = session.preview()
        if image is None:
            return
        import numpy as np

        array = np.ascontiguousarray(np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image,
                                                dtype=np.uint8))
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(self.job_dir(record.id) / PREVIEW_FILE, buffer.getvalue())
        with self._lock:
            self._previews[record.id] = array
            record.has_preview = True


def _json_safe(value):
    """A non-finite float (a NaN teacher's checksum) as its text: job.json stays strict JSON, readable back."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _checked_int(value, what: str, lo: int, hi: int) -> int:
    try:
        return validation.number(value, what, lo=lo, hi=hi, integer=True)
    except validation.ValidationError as error:
        raise JobError(str(error)) from None


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


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
