"""What a TDM-distilled LoRA records about its student, carried on the MODEL from the loader to the samplers.

TDM LoRA Loader (and TDM LoRA from Distill Job) put the record in the MODEL's `model_options`, which ComfyUI's clone
copies with the MODEL and hands to samplers in `extra_args["model_options"]`; the samplers' `auto` follows it.
"""

from __future__ import annotations

# The solver a distilled student's LoRA records (LoraFile.recorded_solver).
STUDENT_SOLVER_OPTION = "tdm_student_solver"
# ... and the grid it was trained on (LoraFile.recorded_grid), which the samplers' preset auto follows.
STUDENT_GRID_OPTION = "tdm_student_grid"


def recorded_student_grid(model):
    """What a TDM-distilled LoRA on `model` records about its training grid: ("preset", name),
    ("timesteps", (t_0, …)) or None."""
    return (getattr(model, "model_options", None) or {}).get(STUDENT_GRID_OPTION)
