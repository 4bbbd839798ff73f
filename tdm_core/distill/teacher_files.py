"""The teacher-files table of a headless run config (`teacher = { factory = "tdm_comfy.teacher:make_backend", ... }`),
checked as data: which ComfyUI model files the teacher is loaded from and TDM Distill's options for it.

Data only (this module never imports ComfyUI): `tdm_comfy/teacher.py` loads what it names; TDM Distill's export
(nodes/headless_export.py) checks a job's recorded files by these same rules before writing a config.
"""

from __future__ import annotations

from ..families import video_latent_frames
from .config import ConfigError

# The teacher options TDM Distill records beside its DistillConfig (nodes/distill_jobs.COMFY_OPTIONS) and their
# defaults here; `offload` is not one: a headless run trains on the device ComfyUI picks for this process.
OPTION_DEFAULTS = {"width": 512, "height": 512, "grid": "auto", "unconditional_prompt": "", "dtype": "auto",
                   "gradient_checkpointing": False, "frames": 33}  # frames: video teachers only (4k + 1)
# The teacher's files as TeacherFiles takes them (what a job records, what a config's teacher table holds).
FILE_FIELDS = ("checkpoint", "diffusion_model", "weight_dtype", "text_encoders", "clip_type", "vae", "loras")
MAX_TEXT_ENCODERS = 3  # Load CLIP takes one file, Dual two, Triple (SD3) three
MAX_LORAS = 16


def _name(value, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024 or "\x00" in value:
        raise ConfigError(f"{field} must be a file name as ComfyUI's loader lists it, got {str(value)[:80]!r}")
    return value


def _number(value, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{field} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


class TeacherFiles:
    """The teacher's files and loader settings of a run config's `teacher` table, checked as data."""

    def __init__(self, checkpoint="", diffusion_model="", weight_dtype="default", text_encoders=None, clip_type="",
                 vae="", loras=None):
        if bool(checkpoint) == bool(diffusion_model):
            raise ConfigError("the teacher needs exactly one of teacher.checkpoint (a file of models/checkpoints) and "
                              "teacher.diffusion_model (a file of models/diffusion_models, with "
                              "teacher.text_encoders)")
        self.checkpoint = _name(checkpoint, "teacher.checkpoint") if checkpoint else ""
        self.diffusion_model = _name(diffusion_model, "teacher.diffusion_model") if diffusion_model else ""
        if not isinstance(weight_dtype, str) or len(weight_dtype) > 64:
            raise ConfigError(f"teacher.weight_dtype must be Load Diffusion Model's weight_dtype, got {weight_dtype!r}")
        self.weight_dtype = weight_dtype
        encoders = [] if text_encoders is None else text_encoders
        if isinstance(encoders, str):
            encoders = [encoders]
        if not isinstance(encoders, list) or len(encoders) > MAX_TEXT_ENCODERS:
            raise ConfigError(f"teacher.text_encoders must be a list of up to {MAX_TEXT_ENCODERS} file names of "
                              "models/text_encoders")
        self.text_encoders = [_name(n, f"teacher.text_encoders[{i}]") for i, n in enumerate(encoders)]
        if self.diffusion_model and not self.text_encoders:
            raise ConfigError("teacher.diffusion_model needs teacher.text_encoders (the files Load CLIP would load)")
        if self.checkpoint and self.text_encoders:
            raise ConfigError("teacher.text_encoders is for teacher.diffusion_model; a checkpoint brings its own")
        if not isinstance(clip_type, str) or len(clip_type) > 64:
            raise ConfigError(f"teacher.clip_type must be Load CLIP's type (sd3, flux, ...), got {clip_type!r}")
        self.clip_type = clip_type
        if self.text_encoders and len(self.text_encoders) < 3 and not clip_type:
            raise ConfigError("teacher.clip_type must say what the text encoders are for, as Load CLIP's `type` "
                              "does (e.g. \"stable_diffusion\", \"sd3\", \"flux\")")
        self.vae = _name(vae, "teacher.vae") if vae else ""
        self.loras = []
        items = [] if loras is None else loras
        if not isinstance(items, list) or len(items) > MAX_LORAS:
            raise ConfigError(f"teacher.loras must be a list of up to {MAX_LORAS} tables "
                              "{ name = \"...\", strength_model = 1.0, strength_clip = 1.0 }")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) - {"name", "strength_model", "strength_clip"}:
                raise ConfigError(f"teacher.loras[{i}] must be a table with name, strength_model, strength_clip")
            self.loras.append((_name(item.get("name"), f"teacher.loras[{i}].name"),
                               _number(item.get("strength_model", 1.0), f"teacher.loras[{i}].strength_model", -100,
                                       100),
                               _number(item.get("strength_clip", 1.0), f"teacher.loras[{i}].strength_clip", -100,
                                       100)))


def check_options(given: dict) -> dict:
    options = dict(OPTION_DEFAULTS)
    for key, value in given.items():
        expected = type(OPTION_DEFAULTS[key])
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ConfigError(f"teacher.{key} must be a {expected.__name__}, got {value!r}")
        options[key] = value
    for key in ("width", "height"):
        if not 16 <= options[key] <= 4096 or options[key] % 16:
            raise ConfigError(f"teacher.{key} must be a multiple of 16 in [16, 4096] pixels, got {options[key]}")
    try:
        valid = video_latent_frames(options["frames"]) and options["frames"] <= 257  # TDM Distill's own bound
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"teacher.frames must be 4k + 1 in [1, 257] (video teachers), got {options['frames']}")
    if len(options["unconditional_prompt"]) > 100_000:
        raise ConfigError("teacher.unconditional_prompt is longer than 100000 characters")
    return options
