"""Checkpoints: the one writer and the one reader of a resumable training state, written so that a crash never
corrupts one. Headless runs (`python -m tdm_core.distill`, via `save_checkpoint`) and ComfyUI jobs
(`tdm_core.jobs.outputs.OutputWriter`) both write through `write_checkpoint` and read through `read_state`, so that
a checkpoint of one is a checkpoint of the other (a headless run can resume from a job's checkpoint folder).

A checkpoint is a folder:
  <checkpoint>/state.tdmckpt               `torch.save` of the session's state dict; a trainer's
                                           (`TDMTrainer.state_dict`, format "tdm-distill-state/1") holds both
                                           adapters, both optimisers, both LR schedules, loss scalers, step, the
                                           trainer's own RNG state and the config
  <checkpoint>/config.json                 the config, readable (written when the state holds one)
  <checkpoint>/<extra files>               what the owner adds: a headless run its student LoRA
The state file is `state.tdmckpt` for every owner: not a model-file extension, because a job's folder lies inside
ComfyUI's `models/loras`, whose lists show every `.pt` file, and a headless run may write there too (its LoRA then
appears in ComfyUI's list; its states must not). Headless runs wrote `state.pt` before; the reader takes either.

Writing: every file is written under a temporary name, fsynced and renamed, inside a temporary folder
(`temporary_folder`: `.tmp-<name>-<pid>` next to the checkpoint); the folder is fsynced, renamed into place (an atomic
rename on POSIX) and its parent fsynced, so a checkpoint folder is either complete or absent. An existing checkpoint
folder is never replaced (the same step saved again after a resume holds the same state). Callers check that what
they save is finite before writing any of it (`check_finite`).

Reading: checkpoint files are untrusted input (anyone who can write to the folder can replace one). The archive's
declared sizes are checked before anything is inflated, it is loaded with `torch.load(weights_only=True)` (tensors
and plain containers only, no code), and the state's shape is checked (`read_state`: a dict with a whole `step`;
`check_trainer_state`: a trainer's fields and their types).

Layouts written before this module was shared, both still read: a headless run's `checkpoint-N/state.pt` (with
`config.json` and `student_lora.safetensors`); a job's `checkpoints/step-N/state.tdmckpt` without `config.json`,
which the reader never needs (the state holds the config).

A headless run's folder (`save_checkpoint`):
  checkpoint-00000100/                    a checkpoint as above, with the student LoRA of that step
  student_lora.safetensors                the newest student LoRA
  .tdm_run.json                           the manifest: which `checkpoint-*` folders this package wrote
Older checkpoints beyond `keep_last` are deleted only after the new one is in place. A run folder is the user's choice
and may hold other files, other tools' `checkpoint-*` folders included: only what the run's manifest records as
written by this package is ever deleted. A temporary folder is recorded before it is created, a checkpoint once it is
published, and a pruned one leaves the manifest before it is deleted (a crash in between leaves a folder nobody
deletes, never a deletion of something not ours); a kill during a save leaves a `.tmp-*` folder the next save removes.
Runs written before the manifest existed keep all their checkpoints. (A job's numbered checkpoints, pruning and
ownership are its record's business: tdm_core/jobs.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

TRAINER_FORMAT = "tdm-distill-state/1"
STATE_FILE = "state.tdmckpt"  # every checkpoint's: a name ComfyUI's model lists never show
LEGACY_STATE_FILE = "state.pt"  # headless runs' checkpoints before the one format (read only)
STATE_FILES = (STATE_FILE, LEGACY_STATE_FILE)
CONFIG_FILE = "config.json"
LORA_FILE = "student_lora.safetensors"
MAX_STEP = 10**9  # far above any run (jobs stop at 1e6 iterations); bounds a planted step before it is used
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_FILE = ".tdm_run.json"
_OWNED_NAME = re.compile(r"checkpoint-\d{8}|\.tmp-checkpoint-\d{8}-\d{1,10}")  # fixed pattern, bounded names
# What `TDMTrainer.load_state_dict` reads, and the type each must have; anything else in a state is ignored by it.
_TRAINER_FIELDS = {"config": dict, "student": dict, "fake": dict, "opt_gen": dict, "opt_fake": dict,
                   "lr_schedule": dict, "generator_rng": torch.Tensor}
_OPTIONAL_TRAINER_FIELDS = {"lr_schedule_fake": dict, "scaler_fake": dict, "scaler_gen": dict,
                            "skipped_in_a_row": int}


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable) -> Path:
    """Calls `write(handle)` on a file under a temporary name (no model-file extension, so never listed), fsyncs,
    renames it to `path`; a failure removes the temporary file. The one atomic writer of the package (checkpoints,
    job records, LoRAs, previews)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of bytes."""
    return atomic_write(path, lambda handle: handle.write(data))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's content: contiguous CPU copies, every header value as a string."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                metadata={str(k): str(v) for k, v in metadata.items()})


class NonFiniteWeightsError(ValueError):
    """Weights to be saved hold NaN or infinite values; nothing was written (the previous files stay)."""


def check_finite(tensors, what: str) -> None:
    """Refuses to save non-finite weights: a NaN LoRA published over a good one turns every image black."""
    from ..validation import non_finite_tensors

    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteWeightsError(f"{what} holds NaN or infinite values ({', '.join(bad[:3])}); it was not written "
                                    "and the previous files are kept. Lower the learning rate or check the teacher.")


def write_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically writes a safetensors LoRA (temporary file, fsync, rename); non-finite weights are refused."""
    check_finite(tensors, f"the LoRA for {Path(path).name}")
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def student_lora(trainer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The student LoRA's tensors (its moving average when the run keeps one) and header."""
    with trainer.averaged_student():
        tensors, metadata = trainer.backend.export_student_lora()
    return tensors, {**metadata, **trainer.export_metadata()}


def export_student_lora(trainer, path: str | Path) -> Path:
    """The student adapter as a LoRA file with TDM metadata (family, K, grid, strength, sampler preset)."""
    tensors, metadata = student_lora(trainer)
    return write_lora(path, tensors, metadata)


# ---- one checkpoint: the shared writer and reader ----------------------------------------------------------------
def temporary_folder(final: str | Path) -> Path:
    """Where `write_checkpoint` assembles `final` (an owner that records what it may delete records this first)."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}-{os.getpid()}")


def _publish(tmp: Path, final: Path) -> None:
    """The commit point of a save: one rename (tests inject failures here)."""
    os.rename(tmp, final)


def write_checkpoint(final: str | Path, state: dict, *, state_file: str = STATE_FILE,
                     files: Mapping[str, bytes] | None = None) -> bool:
    """Publishes the checkpoint folder `final`: `state` (`torch.save`d as `state_file`), `config.json` when the state
    holds a config, and `files` (name → bytes). Returns False, writing nothing, when `final` exists already. A
    failure leaves no trace (the temporary folder is removed); a kill leaves only the temporary folder."""
    final = Path(final)
    if state_file not in STATE_FILES:
        raise ValueError(f"a checkpoint's state file is one of {STATE_FILES}, not {state_file!r}")
    _check_state(state, f"the state to be saved as {final / state_file}")  # what is written can be read back
    if final.exists():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(final)
    tmp.mkdir()
    try:
        atomic_write(tmp / state_file, lambda handle: torch.save(state, handle))
        if isinstance(state.get("config"), dict):
            atomic_write_bytes(tmp / CONFIG_FILE, json.dumps(state["config"], indent=2).encode("utf-8"))
        for name, data in (files or {}).items():
            atomic_write_bytes(tmp / name, data)
        fsync_dir(tmp)
        _publish(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def state_file(folder: str | Path) -> Path | None:
    """The state file of checkpoint folder `folder` (either name), or None when it holds none."""
    for name in STATE_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _check_state(state, what: str) -> dict:
    from ..validation import ValidationError, number

    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ValidationError(f"{what} is not a training state (a dict with text keys), got {type(state).__name__}")
    if "step" not in state:
        raise ValidationError(f"{what} is not a training state: it has no step")
    number(state["step"], f"{what}: step", lo=0, hi=MAX_STEP, integer=True)
    if isinstance(state["step"], float):
        raise ValidationError(f"{what}: step must be a whole number, got {state['step']!r}")
    if "format" in state and state["format"] != TRAINER_FORMAT:
        raise ValidationError(f"{what} is not a TDM distillation state (format {str(state['format'])[:60]!r})")
    return state


def read_state(path: str | Path, step: int | None = None) -> dict:
    """The state of a checkpoint folder (or of a state file), checked as untrusted input: declared archive sizes
    before torch.load inflates anything, weights-only loading, a dict with a whole `step` (equal to `step` when
    given: a folder's state replaced by another step's is refused). Any session's state; `check_trainer_state`
    checks a trainer's."""
    path = Path(path)
    file = path if path.is_file() else state_file(path)
    if file is None:
        raise FileNotFoundError(f"{path} holds no {' or '.join(STATE_FILES)}")
    from ..lora.files import check_torch_archive

    check_torch_archive(file)  # declared sizes checked before torch.load inflates anything
    state = _check_state(torch.load(file, map_location="cpu", weights_only=True), str(file))
    if step is not None and int(state["step"]) != step:
        from ..validation import ValidationError

        raise ValidationError(f"{file} holds the state of step {state['step']}, not of step {step}")
    return state


def check_trainer_state(state: dict, what: str = "the checkpoint") -> dict:
    """A `TDMTrainer` state: its format, and every field `TDMTrainer.load_state_dict` reads with its type, adapters
    as named tensors. (Whether the adapters fit the model, names and shapes, is the backend's to check as it loads
    them: it has its parameters at hand, this reader does not.)"""
    from ..validation import ValidationError

    if state.get("format") != TRAINER_FORMAT:
        raise ValidationError(f"{what} is not a TDM distillation state (format {str(state.get('format'))[:60]!r})")
    for fields, required in ((_TRAINER_FIELDS, True), (_OPTIONAL_TRAINER_FIELDS, False)):
        for name, kind in fields.items():
            if name not in state and not required:
                continue
            if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
                raise ValidationError(f"{what}: {name} must be a {kind.__name__}, got {type(state.get(name)).__name__}")
    rng = state["generator_rng"]
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise ValidationError(f"{what}: generator_rng is not a generator state ({rng.dtype}, {rng.dim()} dims)")
    for adapter in ("student", "fake"):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[adapter].items()):
            raise ValidationError(f"{what}: the {adapter} adapter must map names to tensors")
    return state


def find_checkpoint(path: str | Path) -> Path | None:
    """`path` itself when it is a checkpoint folder (a headless run's or a job's), else the newest `checkpoint-*`
    folder of run folder `path`; None when there is none."""
    path = Path(path)
    if state_file(path) is not None:
        return path
    return latest_checkpoint(path)


def load_checkpoint(path: str | Path) -> dict:
    """The trainer state of a checkpoint folder (a headless run's or a job's), or of the newest checkpoint in a run
    folder: `read_state` and `check_trainer_state`."""
    folder = find_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint-* folder with a {' or '.join(STATE_FILES)} in {path}")
    file = state_file(folder)
    return check_trainer_state(read_state(file), str(file))


# ---- a headless run's folder ----------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    # only folders that hold a state file: a run folder may hold other tools' checkpoint-* folders
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)) and state_file(p) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _read_manifest(run_dir: Path) -> dict:
    """The run's record of the folders it wrote; a missing or damaged one owns nothing (so nothing is deleted)."""
    from ..validation import ValidationError, json_object, loads_json

    empty = {"checkpoints": [], "temporary": []}
    try:
        data = json_object(loads_json((run_dir / MANIFEST_FILE).read_bytes(), MANIFEST_FILE, max_bytes=1 << 20),
                           MANIFEST_FILE)
    except FileNotFoundError:
        return empty
    except (OSError, ValidationError) as error:
        print(f"[comfyui-tdm] ignoring {run_dir / MANIFEST_FILE} ({error}): no old checkpoint of this run is deleted")
        return empty
    manifest = {}
    for key in empty:
        value = data.get(key, [])
        manifest[key] = [v for v in value if isinstance(v, str) and _OWNED_NAME.fullmatch(v)] if isinstance(
            value, list) else []
    return manifest


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(run_dir / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))


def save_checkpoint(trainer, run_dir: str | Path, *, state: dict | None = None,
                    lora: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> Path:
    """Writes `checkpoint-<step>` (with the student LoRA) into run folder `run_dir` and the newest LoRA next to it;
    keeps the newest `config.keep_last` of the checkpoints the manifest owns. Nothing is written when the state or
    the LoRA is non-finite. `state` and `lora` (`student_lora`'s tensors and metadata): what an FSDP trainer gathered
    on every process, for process 0 to write; by default they are taken from the trainer here."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(run_dir)
    for stale in manifest["temporary"]:  # interrupted saves of this run (recorded before they were created)
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    manifest["temporary"] = []
    final = run_dir / f"checkpoint-{trainer.step_count:08d}"
    state = trainer.state_dict() if state is None else state
    check_finite(state, f"the training state of step {trainer.step_count}")
    lora_bytes = None
    if getattr(trainer.backend, "mode", "lora") == "lora" and hasattr(trainer.backend, "export_student_lora"):
        tensors, metadata = student_lora(trainer) if lora is None else lora
        check_finite(tensors, f"the student LoRA of step {trainer.step_count}")
        lora_bytes = safetensors_bytes(tensors, metadata)
    manifest["temporary"].append(temporary_folder(final).name)
    _write_manifest(run_dir, manifest)
    # The same step saved again (right after a resume) holds the same state: the published folder stays. A folder of
    # that name the manifest does not record (another tool's, or a run from before manifests) is left as it is and
    # stays not ours: never pruned.
    published = write_checkpoint(final, state, files={LORA_FILE: lora_bytes} if lora_bytes is not None else None)
    if lora_bytes is not None:
        atomic_write_bytes(run_dir / LORA_FILE, lora_bytes)
    manifest["temporary"] = []
    if published:
        manifest["checkpoints"].append(final.name)
    owned = sorted(manifest["checkpoints"])
    drop = [name for name in owned[: -trainer.config.keep_last] if name != final.name]
    manifest["checkpoints"] = [name for name in owned if name not in drop]
    _write_manifest(run_dir, manifest)  # durable before anything it drops is deleted
    for name in drop:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return final
