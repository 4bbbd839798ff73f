"""The 4-step SDXL and Flux-dev students that TDM Distill makes through a live ComfyUI server beat their teacher's own
4 steps, on a toy teacher that has learned something (`tdm_devkit/toy_latent_teacher.py`: every latent element is ±1,
the prompt sets the share of +1; the teacher is the family's tiny twin trained on it, cached between runs).

**The criterion** (stated in the issue note too): for each training prompt, the 1-D Wasserstein distance between the
element values of 4-step samples and of the teacher's 50-step samples (`value_distance`, N samples of every set,
independent seeds). The teacher's 4 steps are visibly off (the first steps only see the mean of ±1, so its samples
stop short of the modes); the student is sampled with the same preset, steps and seed as the teacher's 4 steps, from
the LoRA the job saved, and must be closer to the teacher's 50 steps than they are, by a margin well above the
distance between two independent 50-step draws (the noise floor, measured here as well).

Everything a user runs is real: the job starts from TDM Distill, runs in the background job manager, saves its LoRA
into models/loras; the samples come from TDM KSampler with the family's preset (TDM LoRA Loader for the student)
and SaveLatent.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch
from test_trainer_server import saved_latent, start_graph, wait_job

from tdm_devkit import comfy_runtime
from tdm_devkit import toy_latent_teacher as toy

# test.sh runs the suite on each ComfyUI it has (0.3.75, then the newest) and names the last in TDM_QUALITY_COMFYUI:
# this test costs minutes, so it runs on that one only (the newest, what users run); test_sdxl_flux_server runs the
# same job path on every runtime. Run alone (no test.sh), it runs on whichever ComfyUI the suite uses.
_QUALITY_RUNTIME = os.environ.get("TDM_QUALITY_COMFYUI")
pytestmark = pytest.mark.skipif(
    _QUALITY_RUNTIME is not None and Path(_QUALITY_RUNTIME).resolve() != comfy_runtime.comfyui_dir().resolve(),
    reason="the student-vs-teacher check runs once per test.sh run, on its newest ComfyUI",
)

SAMPLES = 128  # samples per set; the distances pool SAMPLES × latent elements values
SEEDS = {"teacher_4": 7, "student_4": 7, "teacher_50": 11, "teacher_50_again": 12}
# TDM Distill settings that differ from the node's defaults, and why (the rest are START_DEFAULTS):
COMMON = {
    "cfg": 1.0,  # the toy teacher is conditional only (never trained on the empty prompt): its own score is the target
    "lora_rank": 16,
    "batch_size": 4,
    "save_every": 0,
    "preview_every": 0,
}
FAMILY_SETTINGS = {
    # iterations/learning rate: the node's 500 / 1e-4 are for real models on a GPU; the toy task gets there sooner
    # with a larger step, within CI's time on 2 CPU cores (an SDXL iteration costs ~4× a Flux one here). Share of the
    # teacher's 4-step distance removed, measured on both runtimes (same teacher file, same figures): SDXL 35 % at
    # 160 iterations, with the job on 1 thread (test.sh's parallel workers) and on 2; with an earlier teacher (trained
    # on 2 threads) 21 % at 80 (CI once passed there: too close to call), 31 % at 120, 45 % at 160. Flux 38 % at 200,
    # 49 % at 300, 52 % at 600. Those were the official demo's recipe; recipe auto then trained both families at equal
    # rates decayed along a cosine over these iterations (tdm_core/recipes.py): SDXL 47 %, Flux 94 % (0.3.75). Flux's
    # recipe now also fits the fake score to the student's output and saves its average (decay 0.995, which over
    # 200 iterations is the plain average of every update, the first ones too): Flux 70 % (0.3.75).
    "sdxl": {"iterations": 160, "learning_rate": 5e-4},
    "flux": {"iterations": 200, "learning_rate": 5e-4},
}
# The student must remove at least this share of its teacher's 4-step distance (summed over the prompts), and be no
# worse than it, give or take the noise floor, on any one prompt. Measured with these settings: SDXL 47 %, Flux 70 %.
REQUIRED_IMPROVEMENT = 0.25


def latent_format(family: str):
    import comfy.latent_formats

    return {"sdxl": comfy.latent_formats.SDXL, "flux": comfy.latent_formats.Flux}[family]()


def sample_graph(family: str, weights: str, prompt: str, steps: int, seed: int, lora: str | None = None) -> dict:
    size = toy.TeacherConfig.for_family(family).image_size
    graph = {
        "model": {"class_type": "TDMTest_TinyModel", "inputs": {"family": family, "seed": 0,
                                                                 "weights_file": weights}},
        "cond": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": family, "text": prompt}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size,
                                                                 "batch_size": SAMPLES}},
    }
    model = ["model", 0]
    if lora is not None:
        graph["lora"] = {"class_type": "TDMLoraLoader", "inputs": {"model": model, "lora_name": lora,
                                                                    "strength_mode": "auto", "strength": 1.0}}
        model = ["lora", 0]
    graph["sample"] = {"class_type": "TDMKSampler", "inputs": {"model": model, "positive": ["cond", 0],
                                                               "latent_image": ["latent", 0], "preset": family,
                                                               "steps": steps, "seed": seed}}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                            "filename_prefix": f"tdm_quality/{uuid.uuid4().hex}"}}
    return graph


def samples(server, family: str, graph: dict) -> torch.Tensor:
    """The saved latents back in the network's latent space (SaveLatent keeps ComfyUI's user-facing scale)."""
    return latent_format(family).process_in(saved_latent(server, server.run_prompt(graph)))


# Measured on 2 CPU cores, both families together: 58 s with one thread per process (test.sh's parallel workers),
# 147 s on two threads; a cold cache adds the teachers (about 35 and 20 s). The limit leaves room for a loaded machine.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_distilled_student_beats_the_teachers_own_four_steps(comfy_server, family):
    server, name = comfy_server, f"tdm_quality_{family}"
    weights = str(toy.teacher_file(toy.TeacherConfig.for_family(family)))  # trained once, then cached

    def draw(prompt: str, kind: str, lora: str | None = None) -> torch.Tensor:
        steps = 50 if kind.startswith("teacher_50") else 4
        return samples(server, family, sample_graph(family, weights, prompt, steps, SEEDS[kind], lora))

    before = {prompt: {kind: draw(prompt, kind) for kind in ("teacher_4", "teacher_50", "teacher_50_again")}
              for prompt in toy.PROMPTS}

    size = toy.TeacherConfig.for_family(family).image_size
    graph = start_graph(family, name, prompts="\n".join(toy.PROMPTS), width=size, height=size,
                        **COMMON, **FAMILY_SETTINGS[family])
    graph["model"]["inputs"]["weights_file"] = weights
    server.run_prompt(graph)
    record = wait_job(server, name, lambda r: r["state"] in ("finished", "failed"), timeout=1200, what="ended")
    assert record["state"] == "finished", record["message"]

    lines, teacher_total, student_total = [], 0.0, 0.0
    for prompt in toy.PROMPTS:
        student = draw(prompt, "student_4", lora=f"{name}.safetensors")
        sets = before[prompt]
        reference = sets["teacher_50"]
        floor = toy.value_distance(sets["teacher_50_again"], reference)
        teacher = toy.value_distance(sets["teacher_4"], reference)
        ours = toy.value_distance(student, reference)
        lines.append(f"{family} '{prompt}': W1 to the teacher's 50 steps: teacher 4 steps {teacher:.4f}, student "
                     f"4 steps {ours:.4f}, two 50-step draws {floor:.4f}")
        # the criterion means something: the teacher's own 4 steps are measurably off
        assert teacher > 2 * floor, lines[-1]
        assert ours < teacher + floor, lines[-1]
        teacher_total += teacher
        student_total += ours
    print("\n".join(lines))
    assert student_total < (1 - REQUIRED_IMPROVEMENT) * teacher_total, "\n".join(lines)
