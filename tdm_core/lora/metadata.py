"""The TDM LoRA header schema: every `tdm.*` entry this pack writes into a safetensors header, the writers that build
them, and the readers that take them back out of a file.

One module, because a header entry is a contract between the code that trains a LoRA and the code that loads it,
possibly years and releases apart: a key spelt twice drifts (`tdm.preset` and `tdm.sampler_preset` are the scar of
that). Product code writes `tdm.*` entries only through the writers below and reads them only through the readers
(tests/test_lora_metadata.py holds every other product file to that).

Header values come from files, so every reader treats them as untrusted: numbers are parsed bounded and checked,
names are looked up in this pack's own tables (a name from a file is never repeated back or used as a path), and a
value that does not check reads as "not recorded", except the strength, which makes `parse_lora` refuse the file
(`check_header`): it would otherwise be applied as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .. import families, validation
from ..presets import PRESETS, student_solver
from ..recipes import RECIPES
from ..schedules import parse_timesteps
from ..solvers import SOLVERS
from .files import LoraFileError

# --------------------------------------------------------------------------------------------------------------
# The keys. Every value is text (safetensors headers hold strings only).

# What the LoRA is for (any TDM LoRA: released-format saves, students of TDM Distill)
FAMILY = "tdm.family"  # a tdm_core.families name; trusted over the key layout when it is a known one
PRESET = "tdm.preset"  # the tdm_core.presets name whose grid/solver/strength the LoRA is sampled with
# The same fact under the name tdm_core.distill wrote before there was one key (a preset name, or for a grid of no
# preset a solver name, "ddim", or `tdm_ddim_<parametrisation>`): no longer written; read, for the students written
# then, only through `recorded_preset`, which takes PRESET first.
SAMPLER_PRESET = "tdm.sampler_preset"
STRENGTH = "tdm.lora_strength"  # the strength `auto` applies, a finite number (|s| ≤ MAX_STRENGTH)

# How a student of TDM Distill was trained and is sampled (tdm_core.distill.trainer.TDMTrainer.export_metadata)
FORMAT_NOTE = "tdm.format_note"  # TRAINED_HERE_NOTE below: marks a student this pack trained (the grid/solver readers)
STEPS = "tdm.steps"  # K, the student's number of sampling steps
GRID = "tdm.grid"  # DistillConfig.grid_name(): `tdm_demo(N=..,K=..)` or `custom:<timesteps>` (informative)
TIMESTEPS = "tdm.timesteps"  # the student's grid as comma-separated schedule indices, descending
PARAMETRISATION = "tdm.parametrisation"  # "eps", "v" or "flow": what the teacher predicts
SOLVER = "tdm.solver"  # the tdm_core.solvers name `auto` samples the student with (TDM LoRA Loader → samplers)
TRAINED_ITERATIONS = "tdm.trained_iterations"  # training iterations behind these weights (a job's snapshot step)
CFG_DISTILLED = "tdm.cfg_distilled"  # the teacher CFG scale distilled into the student (sample it at CFG 1)
SCHEDULE_KIND = "tdm.schedule_kind"  # the teacher's noise schedule kind (tdm_core.distill.schedule)
RECIPE = "tdm.recipe"  # the tdm_core.recipes name trained with, or "custom"
RECIPE_CHANGES = "tdm.recipe_changes"  # the knobs TDM Distill's user changed from the recipe, "name value, ..."

# The adapter itself (tdm_core.distill.backend.PeftBackend.export_student_lora)
LORA_RANK = "tdm.lora_rank"  # r of every module (informative: the factors' shapes say it again)
LORA_ALPHA = "tdm.lora_alpha"  # alpha of every module (informative: alpha keys or the diffusers entry state it)
FORMAT = "tdm.format"  # "comfyui" when the keys are ComfyUI-native (`diffusion_model.*`); absent otherwise

# A distillation job's snapshot (tdm_core.jobs.outputs), so a file in models/loras says which job made it
JOB_ID = "tdm.job_id"
JOB_NAME = "tdm.job_name"

# Entries of other tools that the readers also honour (not ours to rename)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig dump, its keys prefixed by component
KOHYA_ALPHA_KEY = "ss_network_alpha"  # kohya sd-scripts' network alpha, for files without alpha tensors

# A note any comfyui-tdm trainer may write (only tdm_core.distill does today); readers match the prefix
TRAINED_HERE_PREFIX = "trained by comfyui-tdm"
TRAINED_HERE_NOTE = f"{TRAINED_HERE_PREFIX} tdm_core.distill"
MAX_STRENGTH = 100.0  # far above any recipe's strength (≤ 1.5); a larger one only makes a broken image
RECIPE_CHANGES_LENGTH = 500  # written cut to this; read back cut to 200 for a status line


# --------------------------------------------------------------------------------------------------------------
# Writers


def tdm_metadata(preset: str | None = None, family: str | None = None, strength: float | None = None,
                 recipe_changes: Iterable[str] | None = None) -> dict[str, str]:
    """Header entries that let the loader pick the right strength and family for a LoRA trained by TDM (a
    released-format save, `save_peft_lora`; TDM Distill's node adds the recipe changes its user made)."""
    entries = {}
    if preset is not None:
        entries[PRESET] = preset
    if family is not None:
        entries[FAMILY] = family
    if strength is not None:
        entries[STRENGTH] = repr(float(strength))
    if recipe_changes is not None:
        entries[RECIPE_CHANGES] = ", ".join(recipe_changes)[:RECIPE_CHANGES_LENGTH]
    return entries


def student_metadata(*, steps: int, grid: str, timesteps: Iterable[int], parametrisation: str, strength: float,
                     preset: str, iterations: int, cfg: float, schedule_kind: str, recipe: str | None,
                     family: str | None) -> dict[str, str]:
    """What a student of TDM Distill records: how to sample it (grid, solver, strength, preset) and how it was
    trained. `preset`: the preset (or solver) name it is sampled with, "" for a grid of no preset."""
    return {
        STEPS: str(steps),
        GRID: grid,
        TIMESTEPS: ",".join(str(t) for t in timesteps),
        PARAMETRISATION: parametrisation,
        STRENGTH: repr(float(strength)),
        # what `auto` samples this student with (TDM LoRA Loader puts it on the MODEL)
        SOLVER: student_solver(preset, parametrisation),
        TRAINED_ITERATIONS: str(iterations),
        CFG_DISTILLED: repr(float(cfg)),
        SCHEDULE_KIND: schedule_kind,
        RECIPE: recipe or "custom",
        FORMAT_NOTE: TRAINED_HERE_NOTE,
    } | ({PRESET: preset} if preset in PRESETS else {}) | ({FAMILY: family} if family else {})


def adapter_metadata(family: str, rank: int, alpha: float, comfy_native: bool = False) -> dict[str, str]:
    """What the student adapter's export states about itself (family, rank, alpha, ComfyUI-native keys)."""
    return {FAMILY: family, LORA_RANK: str(rank), LORA_ALPHA: repr(alpha)} | ({FORMAT: "comfyui"} if comfy_native
                                                                             else {})


def job_metadata(job_id: str, job_name: str, iterations: int) -> dict[str, str]:
    """The job a snapshot in models/loras comes from, and its step (overrides the trainer's own iteration count)."""
    return {JOB_ID: job_id, JOB_NAME: job_name, TRAINED_ITERATIONS: str(iterations)}


# --------------------------------------------------------------------------------------------------------------
# Readers (untrusted values: see the module docstring)


def check_header(metadata: Mapping[str, str], file_name: str) -> None:
    """The strength a TDM-trained LoRA records is applied as it is in auto mode: it must be a finite number."""
    value = metadata.get(STRENGTH)
    if value is None:
        return
    try:
        validation.number_text(value, f"its header entry {STRENGTH}", lo=-MAX_STRENGTH, hi=MAX_STRENGTH)
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}': {error}. Use strength_mode manual, or remove or fix that header "
                            "entry.") from None


def recorded_strength(metadata: Mapping[str, str]) -> float | None:
    value = metadata.get(STRENGTH)
    try:
        return validation.number_text(value, STRENGTH, lo=-MAX_STRENGTH, hi=MAX_STRENGTH) if value is not None else None
    except validation.ValidationError:
        return None  # parse_lora refuses such a file; a LoraFile built by hand just has no recorded strength


def recorded_family(metadata: Mapping[str, str]) -> str | None:
    """The family the header names, when it is one tdm_core.families knows (else the key layout decides)."""
    recorded = metadata.get(FAMILY)
    return recorded if families.is_known(recorded or "") else None


def recorded_preset(metadata: Mapping[str, str]) -> str | None:
    """The preset (or solver) name the LoRA records: `tdm.preset`, else the older `tdm.sampler_preset` (students
    TDM Distill wrote before the one key, which still carry only it). Unchecked: callers look it up in PRESETS."""
    return metadata.get(PRESET) or metadata.get(SAMPLER_PRESET) or None


def trained_here(metadata: Mapping[str, str]) -> bool:
    """Whether TDM Distill wrote this LoRA (its `tdm.format_note`, `student_metadata`)."""
    return metadata.get(FORMAT_NOTE, "").startswith(TRAINED_HERE_PREFIX)


def recorded_solver(metadata: Mapping[str, str]) -> str | None:
    """The solver a LoRA that TDM Distill wrote says its student is sampled with; None when the file records none,
    or a name that is not one of tdm_core.solvers'. Students written before `tdm.solver` existed get their family's
    choice from the preset and parametrisation they record."""
    value = metadata.get(SOLVER)
    if value is not None:
        return value if value in SOLVERS else None
    parametrisation = metadata.get(PARAMETRISATION)
    if trained_here(metadata) and parametrisation in ("eps", "v", "flow"):
        return student_solver(recorded_preset(metadata) or "", parametrisation)
    return None


def recorded_grid(metadata: Mapping[str, str]) -> tuple[str, str | tuple[int, ...]] | None:
    """The grid a student TDM Distill trained is sampled on: ("preset", name) for a preset's grid, ("timesteps",
    (t_0, …)) for a grid of no preset on an ε/v model (the training demo's, say: schedule indices, at most 64,
    strictly descending in [0, 999]); None for any other file, or a value that does not check."""
    if not trained_here(metadata):
        return None
    preset = recorded_preset(metadata)
    if preset in PRESETS:
        return ("preset", preset)
    text = metadata.get(TIMESTEPS, "")
    if metadata.get(PARAMETRISATION) not in ("eps", "v") or not 0 < len(text) <= 400:
        return None
    try:
        timesteps = parse_timesteps(text)
    except ValueError:
        return None
    return ("timesteps", timesteps) if len(timesteps) <= 64 else None


def trained_recipe(metadata: Mapping[str, str]) -> str | None:
    """"trained with <recipe> (<title>)[; changed: ...]" for a LoRA TDM Distill wrote with a known recipe; None
    otherwise (an unknown name is not repeated, the changes are cut short)."""
    recipe = RECIPES.get(metadata.get(RECIPE, ""))
    if recipe is None:
        return None
    text = f"trained with the {recipe.name} recipe ({recipe.title})"
    changes = metadata.get(RECIPE_CHANGES, "")
    if changes and changes.isprintable():
        text += f"; changed: {changes[:200]}"
    return text
