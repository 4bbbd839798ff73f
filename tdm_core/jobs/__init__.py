"""Background distillation jobs: one worker thread, state persisted on disk, atomic outputs, stop and resume.

A job trains one LoRA under a validated output name in a LoRA folder (ComfyUI's `models/loras`):

  <loras>/<name>.safetensors                  the newest student LoRA (replaced atomically at every save)
  <loras>/<name>-step00000200.safetensors     one snapshot per save, the last `keep_last` kept
  <loras>/.tdm_jobs/<job id>/job.json         the job's record: state, progress, losses, settings, messages
  <loras>/.tdm_jobs/<job id>/checkpoints/step-00000200/state.tdmckpt   resumable training state (last `keep_last`)
  <loras>/.tdm_jobs/<job id>/checkpoints/step-00000200/config.json     that state's DistillConfig, readable
  <loras>/.tdm_jobs/<job id>/preview.npy      the latest student sample (uint8 H×W×3)

A record's `settings` hold what the job learns in one vocabulary: {"config": the `DistillConfig` (`to_dict()`),
"comfy": the options of the owner that the config does not hold (ComfyUI's: size, grid choice, memory options...),
"recipe_description", "grid_description"} (lines for the panel and the status); TDM Distill rebuilds a resumed job's
runtime from them (records written before hold its widget values instead: nodes/distill_jobs.py converts those). Read
back, the config is checked field by field (`record_config`). A checkpoint folder holds the config its state was trained with (inside the state, where it wins on resume,
and as `config.json`), so the folder is one the CLI's `--resume` reads.

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

Modules, one responsibility each, each importing only those above it (no cycle):
  errors    the exception types
  records   names a job may write, the record (`JobRecord`), its validation when read back (its config's too), the
            record store
  board     the shared state (`JobBoard`): one lock, the job tables, a record change committed to disk and published;
            the lock is never held across I/O or a device move
  outputs   checkpoints, LoRA snapshots, the latest LoRA and previews (write-ahead ownership, pruning, crash leftovers)
  worker    the worker thread and one job's training loop, on the board and the output writer
  manager   commands, queries and the queue, on the board; owns the worker
  session   what a job runs (`TDMSession`) and how a failure is described
"""

from .errors import JobError, NonFiniteLoss, NonFiniteWeights, NotOwned
from .manager import JobManager, check_same_teacher
from .records import (
    ACTIVE_STATES,
    CHECKPOINT_FILE,
    JOB_STATES,
    JOBS_FOLDER,
    LORA_EXTENSION,
    MAX_HISTORY,
    MAX_ITERATIONS,
    PREVIEW_FILE,
    RECORD_FILE,
    JobRecord,
    RecordStore,
    record_config,
    record_from_disk,
    snapshot_name,
    validate_output_name,
)
from .session import JobRuntime, TDMSession, TrainingSession, describe_failure

__all__ = [
    "ACTIVE_STATES", "CHECKPOINT_FILE", "JOB_STATES", "JOBS_FOLDER", "LORA_EXTENSION", "MAX_HISTORY", "MAX_ITERATIONS",
    "PREVIEW_FILE", "RECORD_FILE", "JobError", "JobManager", "JobRecord", "JobRuntime", "NonFiniteLoss",
    "NonFiniteWeights", "NotOwned", "RecordStore", "TDMSession", "TrainingSession",
    "check_same_teacher", "describe_failure", "record_config", "record_from_disk", "snapshot_name",
    "validate_output_name",
]
