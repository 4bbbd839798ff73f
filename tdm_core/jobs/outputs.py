"""The files a job writes besides its record: resumable checkpoints, LoRA snapshots and the latest LoRA, previews.

Every file is written under a temporary name, fsynced and renamed into place. A checkpoint folder is written and read
by `tdm_core.distill.checkpoint` (`write_checkpoint`, `read_state`), the one checkpoint format, which a headless run
writes too: a job's checkpoint is also one `python -m tdm_core.distill --resume` reads. What stays here is the job's
bookkeeping: numbered `step-N` folders, keep_last pruning, reconciling the record at load, ownership.

Ownership is write-ahead: the record names a file (durably) before the file is written, and names the files it drops
under `pruning` (durably) before they are deleted, so a crash at any point leaves no file of ours that the record does
not name, and nothing is ever deleted or overwritten that the record does not name.

The writer holds no lock of its own and never the jobs' lock across I/O: every change to a record goes through the
`board.JobBoard` it shares with the manager and the worker, `commit` (applies a change under the board's lock, then
writes the record outside it and raises if that fails) or `commit_or_note` (the same, but a failed write is noted in
the record's message instead of raised).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch

from .. import validation
from ..distill import checkpoint as checkpoint_files
from ..distill.checkpoint import atomic_write_bytes, safetensors_bytes
from ..lora import metadata as lora_metadata
from .board import JobBoard
from .errors import NonFiniteWeights, NotOwned
from .records import CHECKPOINT_FILE, LORA_EXTENSION, PREVIEW_FILE, JobRecord, is_snapshot_of, snapshot_name


class OutputWriter:
    """A job's files in the LoRA folder and in its job folder; record changes go through the shared `board`."""

    def __init__(self, loras_dir: str | Path, board: JobBoard):
        self.loras_dir = Path(loras_dir)
        self.board = board

    def job_dir(self, job_id: str) -> Path:
        return self.board.store.job_dir(job_id)

    # ---- names ------------------------------------------------------------------------------------------------
    def checkpoint_dir(self, job_id: str, step: int) -> Path:
        return self.job_dir(job_id) / "checkpoints" / f"step-{step:08d}"

    def lora_path(self, file_name: str) -> Path:
        """An owned LoRA file's path, confined to the LoRA folder (symlinks resolved) once more before any write or
        delete: the folder may have changed since the record was validated."""
        try:
            validation.confined(self.loras_dir, file_name, "LoRA file")
        except validation.ValidationError as error:
            raise NotOwned(f"refusing to touch {file_name!r}: {error}") from None
        return self.loras_dir / file_name

    def snapshot_files(self, name: str) -> list[str]:
        """Files in the LoRA folder named like snapshots of job output `name` (compared as text, no pattern)."""
        folder = (self.loras_dir / name).parent
        base = name.rsplit("/", 1)[-1]
        try:
            entries = sorted(os.listdir(folder)) if folder.is_dir() else []
        except OSError:
            return []
        prefix = name[: len(name) - len(base)]
        return [prefix + entry for entry in entries if is_snapshot_of(base, entry)]

    # ---- checkpoints and LoRAs -------------------------------------------------------------------------------------
    def load_checkpoint(self, record: JobRecord) -> dict:
        """The state of the record's checkpoint, read as the untrusted file it is (`checkpoint.read_state`: sizes
        checked before anything inflates, weights-only, the step the record names)."""
        folder = self.checkpoint_dir(record.id, record.checkpoint_step)
        if checkpoint_files.state_file(folder) is None:
            raise FileNotFoundError(f"the checkpoint of step {record.checkpoint_step} ({folder / CHECKPOINT_FILE}) "
                                    "is gone")
        return checkpoint_files.read_state(folder, step=record.checkpoint_step)

    def save(self, record: JobRecord, session) -> None:
        """The record names the step's files; then the checkpoint, the LoRA snapshot and the latest LoRA are written,
        each atomic (a kill in between leaves names that `reconcile` drops at load, never a file the record does not
        name). Nothing is written when the weights are non-finite (the last good files stay published), and nothing is
        overwritten that the record does not name. Older snapshots and checkpoints are deleted only after the record that drops them is durable."""
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
            if self.lora_path(file_name).exists() and not record.owns(file_name):
                raise NotOwned(f"models/loras/{file_name} exists and was not written by this job (another job's "
                               "LoRA or your file); it was left untouched. Move it away, or start the job under "
                               "another output name")
        data = safetensors_bytes(tensors, {**metadata, **lora_metadata.job_metadata(record.id, record.name, step)})

        def name_the_files(r: JobRecord) -> None:
            # Write-ahead: the record names the files before they exist, so a crash after writing one never leaves a
            # file of ours that the record does not own (and a resume may overwrite it).
            if step not in r.checkpoints:
                r.checkpoints.append(step)
            if snapshot not in r.loras:
                r.loras.append(snapshot)
            r.pruning = [f for f in r.pruning if f != snapshot]
            r.latest_lora = latest

        self.board.commit(record, name_the_files)
        final = self.checkpoint_dir(record.id, step)
        if not final.exists():  # the same step again (right after a resume): the state on disk is this one
            shutil.rmtree(checkpoint_files.temporary_folder(final), ignore_errors=True)  # this process's, if any
            checkpoint_files.write_checkpoint(final, state, state_file=CHECKPOINT_FILE)
        atomic_write_bytes(self.lora_path(snapshot), data)
        atomic_write_bytes(self.lora_path(latest), data)

        def publish(r: JobRecord) -> None:
            r.checkpoint_step = step
            drop = r.loras[: -r.keep_last]
            r.loras = r.loras[-r.keep_last:]
            r.pruning += [f for f in drop if f not in r.pruning]
            r.checkpoints.sort()
            drop_steps = [s for s in r.checkpoints[: -r.keep_last] if s != step]
            r.checkpoints = [s for s in r.checkpoints if s not in drop_steps]
            r.pruning_checkpoints += [s for s in drop_steps if s not in r.pruning_checkpoints]

        self.board.commit(record, publish)  # durable before anything it drops is deleted
        self.prune(record)
        self.board.emit("tdm.job.saved", {"id": record.id, "name": record.name, "step": step,
                                          "lora": record.latest_lora, "snapshot": snapshot})

    def prune(self, record: JobRecord) -> None:
        """Deletes what the durable record lists under pruning (only files it names; each confined again)."""
        files, steps = self.board.read(record, lambda r: (list(r.pruning), list(r.pruning_checkpoints)))
        if not files and not steps:
            return
        for file_name in files:
            if file_name in record.loras or file_name == record.latest_lora:
                continue  # kept again since (a resume saved that step anew)
            try:
                self.lora_path(file_name).unlink(missing_ok=True)
            except (OSError, NotOwned) as error:
                print(f"[comfyui-tdm] TDM job {record.id}: could not delete {file_name}: {error}")
                return
        for step in steps:
            if step in record.checkpoints or step == record.checkpoint_step:
                continue
            shutil.rmtree(self.checkpoint_dir(record.id, step), ignore_errors=True)

        def forget(r: JobRecord) -> None:
            r.pruning = [f for f in r.pruning if f not in files]
            r.pruning_checkpoints = [s for s in r.pruning_checkpoints if s not in steps]

        self.board.commit_or_note(record, forget)

    def clean_leftovers(self, record: JobRecord) -> None:
        """What a crash can leave: temporary files of this job's own writes (`.<file>.<pid>.<thread>.partial` next
        to each file the record names, temporary checkpoint folders in the job's folder), deletions the record
        had made durable but not done, and names the record wrote ahead of files that never came to exist
        (`reconcile`). Only names derived from the record are touched, and never a temporary file of this process
        (another thread may be writing it: a failed write removes its own)."""
        try:
            self.reconcile(record)
            owned = {record.latest_lora, *record.loras, *record.pruning} - {""}
            folders: dict[Path, set[str]] = {}
            for file_name in owned:
                path = self.lora_path(file_name)
                folders.setdefault(path.parent, set()).add("." + path.name + ".")
            for folder, prefixes in folders.items():
                if folder.is_dir():
                    for entry in os.listdir(folder):
                        if _crash_leftover(entry) and any(entry.startswith(p) for p in prefixes):
                            (folder / entry).unlink(missing_ok=True)
            own = self.job_dir(record.id)
            for folder in (own, own / "checkpoints", *[own / "checkpoints" / f"step-{s:08d}"
                                                        for s in record.checkpoints]):
                if not folder.is_dir():
                    continue
                for entry in os.listdir(folder):
                    # `checkpoint.temporary_folder` of a `step-N` folder: a save killed before its rename
                    if entry.startswith(".tmp-step-") and (folder / entry).is_dir():
                        shutil.rmtree(folder / entry, ignore_errors=True)
                    elif entry.startswith(".") and _crash_leftover(entry):
                        (folder / entry).unlink(missing_ok=True)
            self.prune(record)
        except (OSError, NotOwned) as error:
            print(f"[comfyui-tdm] TDM job {record.id}: cleaning crash leftovers failed: {error}")

    def reconcile(self, record: JobRecord) -> None:
        """A save names its snapshot and checkpoint in the record before writing them (write-ahead, so a file of
        ours is never unowned); a process killed in between leaves names of files that do not exist. Those names
        go: a snapshot or latest LoRA not in the LoRA folder, an unpublished checkpoint step without its state
        file."""
        def exists(file_name: str) -> bool:
            try:
                return self.lora_path(file_name).is_file()
            except NotOwned:
                return True  # not ours to judge: the record's validation and pruning deal with it

        missing = [f for f in record.loras if not exists(f)]
        latest_missing = bool(record.latest_lora) and not exists(record.latest_lora)
        gone = [s for s in record.checkpoints if s != record.checkpoint_step
                and checkpoint_files.state_file(self.checkpoint_dir(record.id, s)) is None]
        if not missing and not gone and not latest_missing:
            return

        def forget(r: JobRecord) -> None:
            r.loras = [f for f in r.loras if f not in missing]
            r.checkpoints = [s for s in r.checkpoints if s not in gone]
            if latest_missing:
                r.latest_lora = ""

        self.board.commit_or_note(record, forget)

    # ---- previews ----------------------------------------------------------------------------------------------
    def write_preview(self, record: JobRecord, image):
        """Saves a uint8 H×W×3 preview next to the record; returns the array (the worker caches it on the board)."""
        import numpy as np

        array = np.ascontiguousarray(np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image,
                                                dtype=np.uint8))
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(self.job_dir(record.id) / PREVIEW_FILE, buffer.getvalue())
        return array

    def read_preview(self, job_id: str):
        """The preview on disk (uint8 H×W×3 numpy array), or None when there is none or it is not one of ours."""
        path = self.job_dir(job_id) / PREVIEW_FILE
        if not path.is_file():
            return None
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            # a preview is ours only if it has the shape and type write_preview writes; anything else is not shown
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or max(array.shape) > 8192:
                raise ValueError(f"shape {array.shape} of {array.dtype} is not an RGB preview")
            return np.array(array)
        except (OSError, ValueError) as error:
            print(f"[comfyui-tdm] ignoring the preview {path}: {error}")
            return None


def _crash_leftover(entry: str) -> bool:
    """A `.partial` temporary file (`atomic_write_bytes`: `.<file>.<pid>.<thread>.partial`) that no live write of
    this process owns."""
    if not entry.endswith(".partial"):
        return False
    parts = entry[: -len(".partial")].rsplit(".", 2)
    return not (len(parts) == 3 and parts[1] == str(os.getpid()))
