"""Checkpoints: a resumable training state and the student LoRA, written so that a crash never corrupts them.

Layout of a run folder:
  checkpoint-00000100/state.pt            both adapters, both optimisers, LR schedule, step, RNG states, config
  checkpoint-00000100/config.json         the config, readable
  checkpoint-00000100/student_lora.safetensors   the student at that step (ComfyUI-loadable)
  student_lora.safetensors                the newest student LoRA
A checkpoint folder is written under a temporary name, every file fsynced, then renamed into place (an atomic
rename on POSIX) and the parent folder fsynced, so a `checkpoint-*` folder is either complete or absent; a kill
during a save leaves only a `.tmp-*` folder, removed by the next save. Older checkpoints beyond `keep_last` are
deleted only after the new one is in place. `state.pt` is read with `torch.load(weights_only=True)`.

A run folder is the user's choice and may hold other files, other tools' `checkpoint-*` folders included: only what
the run's manifest (`.tdm_run.json`) records as written by this package is ever deleted. A temporary folder is
recorded before it is created, a checkpoint once it is published, and a pruned one leaves the manifest before it is
deleted (a crash in between leaves a folder nobody deletes, never a deletion of something not ours). Runs written
before the manifest existed keep all their checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch

STATE_FILE = "state.pt"
LORA_FILE = "student_lora.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_FILE = ".tdm_run.json"
_OWNED_NAME = re.compile(r"checkpoint-\d{8}|\.tmp-checkpoint-\d{8}-\d{1,10}")  # fixed pattern, bounded names


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` under a temporary name (no model-file extension, so never listed), fsyncs, renames; a failure
    removes the temporary file. The one atomic writer of the package (checkpoints, job records, LoRAs, previews)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


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
    tensors, metadata = trainer.backend.export_student_lora()
    return tensors, {**metadata, **trainer.export_metadata()}


def export_student_lora(trainer, path: str | Path) -> Path:
    """The student adapter as a LoRA file with TDM metadata (family, K, grid, strength, sampler preset)."""
    tensors, metadata = student_lora(trainer)
    return write_lora(path, tensors, metadata)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _publish(tmp: Path, final: Path) -> None:
    """The commit point of a save: one rename (tests inject failures here)."""
    os.rename(tmp, final)


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


def save_checkpoint(trainer, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(run_dir)
    for stale in manifest["temporary"]:  # interrupted saves of this run (recorded before they were created)
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    manifest["temporary"] = []
    final = run_dir / f"checkpoint-{trainer.step_count:08d}"
    state = trainer.state_dict()
    check_finite(state, f"the training state of step {trainer.step_count}")
    lora = None
    if getattr(trainer.backend, "mode", "lora") == "lora" and hasattr(trainer.backend, "export_student_lora"):
        lora = student_lora(trainer)
        check_finite(lora[0], f"the student LoRA of step {trainer.step_count}")
    tmp = run_dir / f".tmp-checkpoint-{trainer.step_count:08d}-{os.getpid()}"
    manifest["temporary"].append(tmp.name)
    _write_manifest(run_dir, manifest)
    tmp.mkdir()
    try:
        with open(tmp / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        (tmp / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2), encoding="utf-8")
        _fsync_file(tmp / "config.json")
        if lora is not None:
            write_lora(tmp / LORA_FILE, *lora)
        fsync_dir(tmp)
        published = False
        if final.exists():
            # The same step saved again (right after a resume): the state is the same; never unpublish the old one.
            # A folder of that name the manifest does not record (another tool's, or a run from before manifests)
            # is left as it is and stays not ours: never pruned.
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish(tmp, final)
            published = True
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lora is not None:
        write_lora(run_dir / LORA_FILE, *lora)
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


def load_checkpoint(path: str | Path) -> dict:
    """The state dict of a checkpoint folder, or of the newest checkpoint in a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        folder = path
    else:
        folder = latest_checkpoint(path)
        if folder is None:
            raise FileNotFoundError(f"no checkpoint-* folder with a {STATE_FILE} in {path}")
    from ..lora.files import check_torch_archive

    check_torch_archive(folder / STATE_FILE)  # declared sizes checked before torch.load inflates anything
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != "tdm-distill-state/1":
        raise ValueError(f"{folder / STATE_FILE} is not a TDM distillation state (format {state.get('format')!r})")
    return state
