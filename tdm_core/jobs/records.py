"""Job records: the names a job may write, what a job's `job.json` holds, and the store that reads and writes it.

`job.json` is data on disk that anyone with access to models/loras can edit: records read back are validated field by
field (`record_from_disk`) and a damaged or planted one is skipped, never acted on. The store writes each record
atomically (temporary name, fsync, rename) and in order: a write carries the version its snapshot was given, and an
older snapshot never replaces a newer one on disk, so writes can happen outside the jobs' lock (status reads never
wait for an fsync) and still never go back in time. A removed job's folder is taken away under the same per-job order,
and writes that arrive after it are dropped: a late write never fails on the missing folder nor brings the job back.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import validation
from ..distill import checkpoint as _checkpoint_files
from ..distill.backend import COMPUTE_DTYPES
from ..distill.config import ConfigError, DistillConfig
from ..distill.teacher_files import FILE_FIELDS, TeacherFiles
from .errors import JobError

JOB_STATES = ("queued", "running", "stopping", "stopped", "failed", "finished")
ACTIVE_STATES = ("queued", "running", "stopping")
JOBS_FOLDER = ".tdm_jobs"
RECORD_FILE = "job.json"
CHECKPOINT_FILE = _checkpoint_files.STATE_FILE  # inside models/loras: a name ComfyUI does not list
PREVIEW_FILE = "preview.npy"
LORA_EXTENSION = ".safetensors"
MAX_HISTORY = 4000  # loss points kept per job (older ones are thinned out, never the newest)
MAX_ITERATIONS = 1_000_000  # the start node's limit; a request or record above it is refused
MAX_EVERY = 1_000_000
MAX_KEEP = 1000
_JOB_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12]; a fixed pattern on bounded text
MAX_RECORD_BYTES = 16 * 1024 * 1024
MAX_TEXT = 1_000_000  # characters of one text in a record's settings (a prompt list, an option)
_MAX_OPTIONS = 64  # entries of a record's `settings.comfy`
_SNAPSHOT_SUFFIX = re.compile(r"-step\d{8}")  # `<name>-step00000200`: reserved for snapshots


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


def is_snapshot_of(name: str, file_name: str) -> bool:
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
    # What the job learns and how it runs, for display, resume checks and resumes: {"config": DistillConfig.to_dict(),
    # "comfy": {the owner's options, ComfyUI's}, "recipe_description", "grid_description"} (`record_settings`); {}
    # for a job started without them, and a record written before holds TDM Distill's node-named values instead.
    settings: dict = field(default_factory=dict)
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
        recipe = self.settings.get("recipe_description")
        if isinstance(recipe, str) and recipe:  # text from job.json: shown, never interpreted
            line += f"\nrecipe: {recipe[:300]}"
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
            if not isinstance(item, str) or not is_snapshot_of(name, item):
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
    validation.json_object(data.get("teacher", {}), "teacher")
    has_preview = data.get("has_preview", False)
    if not isinstance(has_preview, bool):
        raise validation.ValidationError("has_preview must be true or false")
    return JobRecord(
        id=job_id, name=name, state=state, iterations=iterations, step=min(step, iterations),
        checkpoint_step=checkpoint_step, message=message[:4000], created=real("created"), updated=real("updated"),
        started=real("started", None, optional=True), save_every=integer("save_every", 0, MAX_EVERY, 100),
        keep_last=integer("keep_last", 1, MAX_KEEP, 3), preview_every=integer("preview_every", 0, MAX_EVERY, 50),
        settings=record_settings(data.get("settings", {})), teacher=dict(data.get("teacher", {})), history=points,
        it_per_s=real("it_per_s"), eta_s=real("eta_s", None, optional=True), loras=files("loras"),
        latest_lora=latest, has_preview=has_preview,
        # records written before checkpoints were listed: the one named by checkpoint_step is this job's
        checkpoints=steps("checkpoints", [checkpoint_step] if checkpoint_step else []),
        pruning=files("pruning"), pruning_checkpoints=steps("pruning_checkpoints", []))


def record_settings(value) -> dict:
    """A record's `settings` read back, checked field by field: the config by `record_config`, `comfy` as a small
    object of plain values (their meaning is the owner's, who checks them by its own rules before use), the two
    descriptions as text; other keys are dropped. Settings without a config (none, or a record written before jobs
    recorded their DistillConfig: TDM Distill's node-named values) are kept as an object for the owner to check."""
    settings = validation.json_object(value, "settings")
    if "config" not in settings:
        return dict(settings)
    checked = {"config": record_config(settings["config"]).to_dict()}
    comfy = validation.json_object(settings.get("comfy", {}), "settings.comfy")
    if len(comfy) > _MAX_OPTIONS:
        raise validation.ValidationError(f"settings.comfy holds more than {_MAX_OPTIONS} options")
    for key, option in comfy.items():
        what = f"settings.comfy.{str(key)[:60]}"
        if not isinstance(key, str) or len(key) > 100:
            raise validation.ValidationError(f"{what}: an option's name must be text of at most 100 characters")
        if isinstance(option, list):
            _texts(option, what)
        elif isinstance(option, str):
            _text(option, what)
        elif not isinstance(option, bool):
            validation.number(option, what)
    checked["comfy"] = dict(comfy)
    for key in ("recipe_description", "grid_description"):
        checked[key] = _text(settings.get(key, ""), f"settings.{key}")
    if "teacher_files" in settings:
        checked["teacher_files"] = _teacher_files(settings["teacher_files"])
    return checked


def _teacher_files(value) -> dict:
    """The teacher's loader files a job recorded (the headless teacher's fields), or {"error": why there are none}.
    Checked by the headless teacher's own rules; an unusable record becomes an error the export shows, never a lost
    job."""
    try:
        files = validation.json_object(value, "settings.teacher_files")
        if set(files) == {"error"}:
            return {"error": _text(files["error"], "settings.teacher_files.error")[:1000]}
        if set(files) == {"diffusers_folder", "dtype"}:  # TDM CogVideoX Loader's folder (nodes/cogvideox_teacher.py)
            validation.lexical_relative(files["diffusers_folder"], "settings.teacher_files.diffusers_folder")
            if files["dtype"] not in COMPUTE_DTYPES:
                raise validation.ValidationError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}")
            return dict(files)
        unknown = set(files) - set(FILE_FIELDS)
        if unknown:
            raise validation.ValidationError(f"unknown fields {sorted(str(k)[:40] for k in unknown)[:5]}")
        TeacherFiles(**files)
    except (validation.ValidationError, ConfigError) as error:
        return {"error": f"the record of the teacher's files is unusable: {str(error)[:300]}"}
    return dict(files)


def _text(value, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise validation.ValidationError(f"{what} must be text of at most {limit} characters")
    return value


def _texts(value, what: str) -> list[str]:
    if not isinstance(value, list) or sum(len(_text(v, what)) for v in value) > MAX_TEXT:
        raise validation.ValidationError(f"{what} must be a list of texts, {MAX_TEXT} characters in all at most")
    return list(value)


def _config_field(value, kind: str, what: str):
    """One DistillConfig field from a record, by its annotation; None where the annotation allows it."""
    if value is None and kind.endswith(" | None"):
        return None
    kind = kind.removesuffix(" | None")
    if kind == "int":
        return validation.number(value, what, lo=0, hi=2**31 - 1, integer=True)
    if kind == "float":
        return validation.number(value, what)
    if kind == "bool":
        if not isinstance(value, bool):
            raise validation.ValidationError(f"{what} must be true or false")
        return value
    if kind == "str":
        return _text(value, what, 1000)
    if kind == "list[str]":
        return _texts(value, what)
    if kind == "list[int]":
        if not isinstance(value, list) or len(value) > 1000:
            raise validation.ValidationError(f"{what} must be a list of at most 1000 whole numbers")
        return [validation.number(v, what, lo=0, hi=MAX_ITERATIONS, integer=True) for v in value]
    if kind == "tuple[float, float]":
        if not isinstance(value, list) or len(value) != 2:
            raise validation.ValidationError(f"{what} must be two numbers")
        return [validation.number(v, what) for v in value]
    if kind == "dict[str, Any]":
        # `teacher`: how the CLI imports a teacher factory; a job's teacher is the MODEL it is given, so a record
        # naming one is planted, and never passed on to anything that could import it
        if value != {}:
            raise validation.ValidationError(f"{what} must be empty in a job's record")
        return {}
    raise validation.ValidationError(f"{what}: no check for a {kind} field")  # a new field: add its check here


_CONFIG_FIELDS = {f.name: f.type for f in fields(DistillConfig)}


def record_config(data) -> DistillConfig:
    """The DistillConfig a job's record holds, every field checked (its type by the field's annotation, then
    `validate()`); a ValidationError names the field. A missing field takes its default. The recipe is kept as the
    name it was: the record holds every knob, so a recipe changed or removed since changes nothing of the job (and
    does not make its record unreadable)."""
    data = validation.json_object(data, "settings.config")
    values = {}
    for key, value in data.items():
        if key not in _CONFIG_FIELDS:
            raise validation.ValidationError(f"settings.config holds an unknown field {str(key)[:60]!r}")
        values[key] = _config_field(value, str(_CONFIG_FIELDS[key]), f"settings.config.{key}")
    recipe = values.pop("recipe", "")
    try:
        config = DistillConfig.from_dict(values)
        config.recipe = recipe
        return config.validate()
    except (ConfigError, TypeError, ValueError) as error:
        raise validation.ValidationError(f"settings.config: {error}") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _json_safe(value):
    """A non-finite float (a NaN teacher's checksum) as its text: job.json stays strict JSON, readable back."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def checked_int(value, what: str, lo: int, hi: int) -> int:
    """`value` as an integer in [lo, hi], or a JobError saying what is wrong (for request fields)."""
    try:
        return validation.number(value, what, lo=lo, hi=hi, integer=True)
    except validation.ValidationError as error:
        raise JobError(str(error)) from None


@dataclass(frozen=True)
class RecordSnapshot:
    """A record's bytes as of one moment, taken under the jobs' lock; written later, outside it."""

    job_id: str
    version: int
    data: bytes


class RecordStore:
    """The `job.json` files under `<loras>/.tdm_jobs/`. Thread-safe on its own; its writes are never called under
    the jobs' lock (they fsync). Per job, writes and the removal are serialised and ordered by snapshot version."""

    def __init__(self, loras_dir: str | Path):
        self.loras_dir = Path(loras_dir)
        self.jobs_dir = self.loras_dir / JOBS_FOLDER
        self._guard = threading.Lock()  # protects the tables below; held for their access only
        self._job_locks: dict[str, threading.Lock] = {}
        self._written: dict[str, int] = {}
        self._retired: set[str] = set()  # removed jobs: their folder is gone on purpose, later writes are dropped
        self._versions = 0

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def snapshot(self, record: JobRecord) -> RecordSnapshot:
        """The record as it is now (call with the jobs' lock held, so the record does not change meanwhile)."""
        record.updated = time.time()
        data = json.dumps(_json_safe(record.to_dict()), indent=1, allow_nan=False).encode("utf-8")
        with self._guard:
            self._versions += 1
            return RecordSnapshot(record.id, self._versions, data)

    def write(self, snapshot: RecordSnapshot) -> None:
        """Makes the snapshot durable unless a newer one of the same job already is (its content includes this
        one's: snapshots are taken from the same live record) or the job was removed. Raises OSError when the write
        fails."""
        with self._job_lock(snapshot.job_id):
            if self._written.get(snapshot.job_id, 0) >= snapshot.version or snapshot.job_id in self._retired:
                return
            _checkpoint_files.atomic_write_bytes(self.job_dir(snapshot.job_id) / RECORD_FILE, snapshot.data)
            with self._guard:
                self._written[snapshot.job_id] = snapshot.version

    def retire(self, job_id: str) -> Path | None:
        """Takes a removed job's folder away in one atomic step: renamed to a dot-name the loader skips (and deletes
        at the next load), returned for the caller to delete; None when there is no folder. Waits for a write of the
        job in progress, and drops every later one: a command or the worker that changed the job just before its
        removal neither fails on the missing folder nor recreates it."""
        with self._job_lock(job_id):
            self._retired.add(job_id)
            tombstone = self.job_dir(job_id).with_name(f".removed-{job_id}")
            try:
                self.job_dir(job_id).rename(tombstone)
            except FileNotFoundError:
                return None
            return tombstone

    def _job_lock(self, job_id: str) -> threading.Lock:
        with self._guard:
            return self._job_locks.setdefault(job_id, threading.Lock())

    def create(self, snapshot: RecordSnapshot) -> None:
        """A new job's folder and record; on any failure nothing of it remains and the error propagates."""
        folder = self.job_dir(snapshot.job_id)
        try:
            folder.mkdir(parents=True, exist_ok=False)
            self.write(snapshot)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def load(self) -> list[JobRecord]:
        """Every valid record on disk, oldest folder first; damaged or planted records are reported and skipped."""
        try:
            # dot-folders are removed jobs whose deletion was interrupted (`retire`): finished here
            folders = sorted(p for p in self.jobs_dir.iterdir() if p.is_dir()) if self.jobs_dir.is_dir() else []
            for leftover in [p for p in folders if p.name.startswith(".removed-")]:
                shutil.rmtree(leftover, ignore_errors=True)
            folders = [p for p in folders if not p.name.startswith(".")]
        except OSError as error:
            print(f"[comfyui-tdm] cannot list the job records in {self.jobs_dir}: {error}")
            return []
        records = []
        for folder in folders:
            path = folder / RECORD_FILE
            if not path.is_file():
                continue
            try:
                if path.stat().st_size > MAX_RECORD_BYTES:
                    raise validation.ValidationError(f"it is larger than {MAX_RECORD_BYTES} bytes")
                records.append(record_from_disk(validation.loads_json(path.read_bytes(), "job.json"), folder.name,
                                                self.loras_dir))
            except (OSError, ValueError) as error:
                # A damaged or planted record must not take the others (or the server) down with it, and is never
                # acted on: its id and file names would decide what is written and deleted.
                print(f"[comfyui-tdm] skipping job record {path}: {error}. Fix or remove that folder.")
        return records
