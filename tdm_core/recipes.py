"""TDM training recipes as data: every value with the source it comes from.

A recipe is the set of `DistillConfig` training knobs a published run used (teacher CFG, both learning rates, AdamW,
gradient clipping per network, LoRA size, how τ is drawn, the importance-weight clip, fake-score updates per
student update, which trajectory steps each update trains, batch). Each model family names the recipe it trains
with (`tdm_core.families.Family.training_recipe`); TDM Distill's `recipe` input ("auto": the teacher
family's) fills its defaults from it, any advanced input overrides a value, and the headless config takes the same
field names. The sources, in this project's words, are in `docs/recipes.md`:

  demo     the official training script `train_tdm_demo.py` (Luo-Yihong/TDM), its defaults (docs/tdm_method.md §2);
  readme   the official README's training command (cfg 4.5, lr 2e-5, pseudo-Huber, separate τ);
  ff       the TDM authors' group's Flow-Factory TDM recipe for SD3.5-medium (`examples/tdm/lora/sd3_5/ocr.yaml`,
           `hparams/training_args/tdm.py` in X-GenGroup/Flow-Factory);
  here     this project's choice where no source applies (the LoRA layout, one GPU), with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import families

SOURCES = {
    "demo": "official train_tdm_demo.py defaults",
    "readme": "official README training command",
    "ff": "Flow-Factory examples/tdm/lora/sd3_5/ocr.yaml",
    "here": "comfyui-tdm",
}


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # a SOURCES key
    why: str = ""  # for "here", and wherever the value is a translation of the source's setting

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"unknown recipe source {self.source!r}; known: {sorted(SOURCES)}")


@dataclass(frozen=True)
class Recipe:
    name: str  # stable id, stored in job records and LoRA metadata: never rename
    title: str
    summary: str
    values: dict[str, Value] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The DistillConfig fields this recipe sets."""
        return {key: v.value for key, v in self.values.items()}

    def cited(self) -> str:
        """One line per value, "name value (source: why)", for the job panel and the README table."""
        lines = []
        for key, v in self.values.items():
            note = f"{SOURCES[v.source]}" + (f": {v.why}" if v.why else "")
            lines.append(f"{key} {v.value!r} ({note})")
        return "\n".join(lines)


_LORA_HERE = "the official script fine-tunes full copies; here both networks are LoRAs on one frozen teacher"
_ONE_GPU = "ComfyUI trains on one GPU; one sample fits a 24 GB card at the family's native size"

# bench/pace.py (500 iterations, seeds 0/1/2) and tests/test_sdxl_flux_quality.py's latent toys (its settings)
_COSINE_MEASURED = (
    "measured here: closer to the teacher on bench/pace.py's mixtures and digits at 500 iterations (ratio to "
    "teacher-50: 2-D 2.02–2.14 → 1.83–1.91, 16-D 2.60–2.68 → 2.50–2.60, digits 1.04–1.10 → 1.00–1.01), farther on "
    "the Flux latent toy (distance to the teacher's 50 steps over its floor at 500 iterations 11.7 → 13.2, SDXL 1.55 "
    "→ 1.56; at the quality check's 160–200 iterations SDXL 19 %, Flux 13 % of the teacher's 4-step distance "
    "removed, below its 25 %)")

# bench/pace.py's SD3/SD3.5 latent toys (500 iterations, seeds 0/1/2): with the student at a fifth of the fake score's
# rate their students barely move
_EQUAL_RATES_MEASURED = (
    "measured here: on bench/pace.py's SD3 and SD3.5 latent toys (500 iterations, seeds 0/1/2) the distance to the "
    "teacher's 50 steps over its floor went from 53.7 to 23.5 (SD3) and 57.0 to 30.4 (SD3.5); on the SDXL toy it "
    "lost (1.55 to 2.03), on Flux it was close (11.7 to 10.8), on the 2-D mixture it lost badly (1.05 to 6.5); the SD3 "
    "family trained this way until official_demo_ff_tau_lora did better on its toys")

# bench/pace.py's SDXL and Flux latent toys (500 iterations, seeds 0/1/2): at equal rates the student gets close fast,
# then drifts back at a constant rate; decayed, it stays close
_EQUAL_RATES_COSINE_MEASURED = (
    "measured here: on bench/pace.py's SDXL and Flux latent toys (500 iterations, seeds 0/1/2) the distance to the "
    "teacher's 50 steps over its floor went from 1.55 to 1.26 (SDXL) and 11.7 to 8.2 (Flux) against the official "
    "demo, 2.03 and 10.8 at equal, constant rates; on the SD3 toys it stalled (42.8, SD3.5 44.7), on the 2-D mixture "
    "it lost (1.05 to 3.5), so only SDXL and Flux train this way")

# bench/pace.py's SD3/SD3.5 latent toys (500 iterations, seeds 0/1/2), against equal rates alone
_FF_TAU_LORA_MEASURED = (
    "measured here: on bench/pace.py's SD3 and SD3.5 latent toys (500 iterations, seeds 0/1/2) the distance to the "
    "teacher's 50 steps over its floor went from 23.5 to 17.5 (SD3) and 30.4 to 16.9 (SD3.5) against equal rates "
    "alone; on the SDXL and Flux toys it lost to their recipe (2.89 against 1.26, 9.19 against 8.2); "
    "official_demo_ff_tau_lora_last_cosine has since done better on the SD3 toys")

# bench/pace.py's SD3/SD3.5 latent toys (500 iterations, seeds 0/1/2; seeds 0-5 by probe), against
# official_demo_ff_tau_lora
_LAST_STEP_COSINE_MEASURED = (
    "measured here: on the SD3 and SD3.5 latent toys (500 iterations, seeds 0/1/2) the distance to the teacher's 50 "
    "steps over its floor went from 17.5 to 4.8 (SD3) and 16.9 to 5.1 (SD3.5) against official_demo_ff_tau_lora "
    "(seeds 0–5: 20.9 ± 2.1 to 5.1 ± 0.4, 15.4 ± 1.7 to 5.5 ± 0.8), the students' spread from 0.82–0.87 of the "
    "teacher's to 0.98–1.00; every step trained with the decay settled too narrow (0.84, 18.6 ± 0.8); on the SDXL "
    "and Flux toys the last step alone lost (2.56 against 1.26, 99 against 8.2: the Flux student's prompt means "
    "drift), so only the SD3 family trains this way")

# bench/pace.py's SD3/SD3.5 latent toys: the moving average of the student on top of the last-step recipe
_STUDENT_EMA_MEASURED = (
    "measured here: on the SD3 and SD3.5 latent toys (500 iterations, seeds 0–5) the distance to the teacher's 50 "
    "steps over its floor went from 5.1 ± 0.4 to 3.4 ± 0.5 (SD3) and 5.5 ± 0.8 to 4.0 ± 0.3 (SD3.5), closer on every "
    "seed: under the decay the student's prompt means still wander by about 0.03 over the last 100 updates, and the "
    "average keeps their centre; decay 0.98 / 0.995 gave 4.4 / 6.0 (SD3) and 4.8 / 5.7 (SD3.5); on the Flux and "
    "SDXL toys under their recipe it changed nothing (8.78 to 8.78, 1.26 to 1.25), so only the SD3 family averages")

# bench/pace.py's Flux latent toy and the fixed-point probe (docs/recipes.md): what the fake score learns from
_FAKE_OUTPUT_MEASURED = (
    "measured here: with the official draw a fake score fitted to a Flux-toy student that already samples its "
    "teacher's 50-step distribution describes one 4–7 % wider, so TDM pushes that student 5–8 % too narrow, the more "
    "so the better the fake score is fitted (3 fake updates: spread 0.86); fitted to the output it describes the "
    "student's own spread (1.00); on the Flux toy (500 iterations, seeds 0–5) the distance to the teacher's 50 steps "
    "over its floor went from 8.8 ± 0.8 to 4.5 ± 0.6, the spread from 0.92 to 1.03; on the SDXL toy it moved 1.47 ± "
    "0.22 to 1.97 ± 0.38 (the spread 1.06 to 1.02, the prompt means wander more), on the SD3 toy with every step "
    "trained 4.9 ± 1.2 against its recipe's 3.3 ± 0.5 (whose last-step updates already fit the output); the mixtures "
    "and digits (official demo, seeds 0/1/2): 2.04 → 1.59, 2.65 → 1.38, 1.06 → 1.00, but 16-D's samples between "
    "modes 5.7 % → 9.3 %, so only Flux trains this way")
_FAKE_OUTPUT_EMA_MEASURED = (
    "measured here: on the Flux toy with the fake score on the output (500 iterations, seeds 0–5) the average took "
    "the distance to the teacher's 50 steps over its floor from 4.5 ± 0.6 to 2.8 ± 0.4 (decay 0.99: 3.9 ± 0.6); "
    "the SDXL toy gained nothing from it (1.54 ± 0.17); a 200-iteration run averages all its updates, the untrained "
    "first ones too (7.2 against 3.5 without the average): set student_ema 0 for runs much shorter than 500")

_DEMO = {
    "cfg": Value(2.0, "demo"),
    "lr": Value(1e-4, "demo", "the fake score's learning rate"),
    "student_lr": Value(2e-5, "demo", "the student at lr / 5"),
    "adam_betas": Value((0.0, 0.95), "demo"),
    "weight_decay": Value(1e-2, "demo"),
    "grad_clip": Value(1.0, "demo", "the student's gradient norm"),
    "grad_clip_fake": Value(None, "demo", "the fake score is not clipped"),
    "lora_rank": Value(16, "here", _LORA_HERE),
    "lora_alpha": Value(None, "here", "alpha = rank: scale 1 in every loader"),
    "tau_mode": Value("separate", "demo", "τ in [max(20, t_mid), t_g − 10): each student step owns its τ range"),
    "tau_density": Value("uniform", "demo"),
    "importance_clip": Value(None, "demo", "unclipped"),
    "fake_updates": Value(1, "demo"),
    "stages": Value("one", "demo", "each sample trains one random step of its trajectory"),
    "batch_size": Value(1, "here", _ONE_GPU),
    "lr_decay": Value("constant", "demo", "a constant learning rate"),
    "student_ema": Value(0.0, "demo", "no average: the student's last weights are what it saves"),
    "fake_samples": Value("step", "demo", "the fake score learns the step each update draws, at τ in that step's "
                          "interval"),
}

# Every update trains the last step only, both rates decayed (official_demo_ff_tau_lora_last_cosine and its average)
_LAST_STEP_COSINE = {
    "stages": Value("last", "here", "the last step (on the SD3 grid σ 0.67 → 0) is the largest jump; "
                    + _LAST_STEP_COSINE_MEASURED),
    "lr_decay": Value("cosine", "here", "with the last step alone: anneals the student's swings"),
}

# Flow-Factory's settings that recipes here take from it, one source each: both networks at one rate (here at the
# demo's 1e-4), its τ draw, its LoRA shape.
_EQUAL_RATES_WHY = "both networks at one rate (Flow-Factory's 1e-5 / 1e-5), here the demo's 1e-4"
_EQUAL_RATES = {"student_lr": Value(1e-4, "ff", _EQUAL_RATES_WHY)}
# The demo at equal rates, both decayed (official_demo_equal_rates_cosine and its fake-output variant)
_EQUAL_RATES_COSINE = _DEMO | _EQUAL_RATES | {"lr_decay": Value("cosine", "here", _EQUAL_RATES_COSINE_MEASURED)}
_FF_TAU = {
    "tau_mode": Value("reverse", "ff", "tdm_query_interval reverse, tdm_query_max_sigma 1.0"),
    "tau_density": Value("logit_normal", "ff", "conditional_logit_normal, mean 0, std 1"),
    "tau_logit_mean": Value(0.0, "ff"),
    "tau_logit_std": Value(1.0, "ff"),
}
_FF_LORA = {"lora_rank": Value(32, "ff"), "lora_alpha": Value(64.0, "ff")}
# The demo's optimiser and CFG with Flow-Factory's rates, τ and LoRA shape: official_demo_ff_tau_lora and its
# last-step variant
_FF_TAU_LORA = _DEMO | _EQUAL_RATES | _FF_LORA | _FF_TAU | {
    "lora_alpha": Value(64.0, "ff", "scale alpha / rank = 2, kept when only the rank is set")}

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("official_demo", "Official demo script",
               "The TDM authors' training script as published (PixArt-α): teacher CFG 2, fake score at 1e-4, student "
               "at a fifth, AdamW (0, 0.95).", dict(_DEMO)),
        Recipe("official_demo_cosine", "Official demo script, cosine-decayed learning rates",
               "The official demo script with both learning rates decayed along a half cosine to 0 over the run: "
               "closer to the teacher on the mixture and digits toys, farther on the SDXL and Flux latent toys.",
               _DEMO | {"lr_decay": Value("cosine", "here", _COSINE_MEASURED)}),
        Recipe("official_demo_equal_rates", "Official demo script, student at the fake score's rate",
               "The official demo script with the student learning as fast as the fake score, as the authors' "
               "Flow-Factory SD3.5 recipe trains both: the SD3-family toys' students moved about twice as "
               "close to their teacher.",
               _DEMO | {"student_lr": Value(1e-4, "ff", _EQUAL_RATES_WHY + "; " + _EQUAL_RATES_MEASURED)}),
        Recipe("official_demo_equal_rates_cosine", "Official demo script, equal rates, cosine-decayed",
               "The official demo script with the student at the fake score's rate (Flow-Factory's ratio) and both "
               "rates decayed along a half cosine to 0 over the run: the SDXL and Flux toys' students got close "
               "fast and stayed there.",
               _EQUAL_RATES_COSINE),
        Recipe("official_demo_equal_rates_cosine_fake_output_ema",
               "Official demo script, equal rates, cosine-decayed, fake score on the output, averaged",
               "official_demo_equal_rates_cosine with the fake score fitted to the student's own samples at every "
               "noise level (not to each drawn step's estimate) and a moving average of the student saved (decay "
               "0.995): the Flux toy's students no longer end too narrow and came three times as close to their "
               "teacher.",
               _EQUAL_RATES_COSINE | {
                   "fake_samples": Value("output", "here", _FAKE_OUTPUT_MEASURED),
                   "student_ema": Value(0.995, "here", _FAKE_OUTPUT_EMA_MEASURED),
               }),
        Recipe("official_demo_ff_tau_lora", "Official demo script with Flow-Factory's rates, τ and LoRA",
               "The official demo's optimiser and CFG with three settings of the authors' Flow-Factory SD3.5 recipe: "
               "the student at the fake score's rate, τ logit-normal up to full noise, LoRA rank 32 / alpha 64. The "
               "SD3-family toys' students got closer to their teacher than at equal rates alone.",
               _FF_TAU_LORA | {
                   "tau_density": Value("logit_normal", "ff", _FF_TAU["tau_density"].why + "; " + _FF_TAU_LORA_MEASURED),
               }),
        Recipe("official_demo_ff_tau_lora_last_cosine",
               "Flow-Factory's rates, τ and LoRA on the demo script, last step only, cosine-decayed",
               "official_demo_ff_tau_lora with every update training the student's last step only and both learning "
               "rates decayed along a half cosine to 0 over the run: the SD3-family toys' students settled three "
               "to four times as close to their teacher.",
               _FF_TAU_LORA | _LAST_STEP_COSINE),
        Recipe("official_demo_ff_tau_lora_last_cosine_ema",
               "Flow-Factory's rates, τ and LoRA on the demo script, last step only, cosine-decayed, averaged",
               "official_demo_ff_tau_lora_last_cosine, saving a moving average of the student's weights (decay 0.99) "
               "instead of its last ones: the SD3-family toys' students ended a third closer to their teacher.",
               _FF_TAU_LORA | _LAST_STEP_COSINE | {
                   "student_ema": Value(0.99, "here", _STUDENT_EMA_MEASURED),
               }),
        Recipe("official_readme", "Official README run",
               "The official README's command: the demo script at CFG 4.5 and learning rate 2e-5.",
               _DEMO | {"cfg": Value(4.5, "readme"), "lr": Value(2e-5, "readme", "the fake score's learning rate"),
                        "student_lr": Value(4e-6, "readme", "the student at lr / 5, as the script does")}),
        Recipe("flow_factory_sd35", "Flow-Factory SD3.5 (the authors' group)",
               "The TDM authors' group's later SD3.5-medium recipe: CFG 4 on the teacher only, both networks at "
               "1e-5 with AdamW (0.9, 0.999), clipped at 1, rank 32 / alpha 64, τ logit-normal up to full noise, "
               "importance weights clipped at 20, all four steps trained in every update.",
               {
                   "cfg": Value(4.0, "ff", "real_guidance_scale; the student and fake score are unguided"),
                   "lr": Value(1e-5, "ff", "the fake optimiser"),
                   "student_lr": Value(1e-5, "ff", "the generator optimiser"),
                   "adam_betas": Value((0.9, 0.999), "ff"),
                   "weight_decay": Value(1e-4, "ff"),
                   "grad_clip": Value(1.0, "ff", "generator max_grad_norm"),
                   "grad_clip_fake": Value(1.0, "ff", "fake max_grad_norm"),
                   **_FF_LORA,
                   **_FF_TAU,
                   "importance_clip": Value(20.0, "ff", "tdm_importance_clip"),
                   "fake_updates": Value(1, "ff", "ttur_fake_updates"),
                   "stages": Value("all", "ff", "all four stage losses averaged"),
                   "batch_size": Value(1, "here", _ONE_GPU + " (Flow-Factory: 128 prompts a step on 8 GPUs)"),
                   "lr_decay": Value("constant", "ff", "the config sets no learning-rate schedule"),
                   "student_ema": Value(0.0, "here", "none: the student's last weights (no average is among the "
                                        "settings this recipe takes from Flow-Factory)"),
                   "fake_samples": Value("step", "ff", "the fake loss on every stage's clean state"),
               }),
    )
}

#: What TDM Distill's `recipe` input offers besides these names: the family's recipe.
AUTO = "auto"
#: The recipe of a grid of no preset (TDM Distill's training_demo grid) under recipe auto. (A headless config without
#: a `recipe` key keeps DistillConfig's defaults: the official demo's.)
DEFAULT_RECIPE = "official_demo"



def get_recipe(name: str) -> Recipe:
    recipe = RECIPES.get(name)
    if recipe is None:
        raise KeyError(f"unknown TDM training recipe {name!r}; known: {', '.join(RECIPES)}")
    return recipe


def resolve(name: str, family: str = "") -> tuple[Recipe, dict[str, Value]]:
    """The recipe and the values it gives a `family` teacher (the recipe's, then the family's overrides)."""
    recipe = get_recipe(name)
    entry = families.get(family)
    overrides = {o.knob: Value(o.value, "here", o.why) for o in entry.recipe_overrides} if entry else {}
    return recipe, dict(recipe.values) | overrides


def family_recipe(family: str) -> str:
    """What recipe "auto" trains a `family` teacher with: its registry entry's, else the official demo's."""
    entry = families.get(family)
    return entry.training_recipe if entry is not None else DEFAULT_RECIPE


# A value that keeps the recipe's ratio to another when a run sets that other itself and leaves it to the recipe: the
# student's learning rate to the fake score's (a recipe's rates are a pair: the demo's student at a fifth), and LoRA
# alpha to rank (the adapters' output scale is alpha / rank: Flow-Factory's rank 32 / alpha 64 is scale 2, and a run at
# rank 8 keeps scale 2 with alpha 16 rather than jumping to scale 8 with alpha 64).
FOLLOWERS = {"student_lr": "lr", "lora_alpha": "lora_rank"}


def follow(knobs: dict[str, Any], recipe_knobs: dict[str, Any], given: set[str]) -> None:
    """Scales, in `knobs`, each FOLLOWERS value the run left to the recipe (not in `given`, the fields it set
    itself) whose leader it set, by the leader's change from the recipe's value. A follower the recipe leaves at None
    (alpha = rank) already follows its leader."""
    for follower, leader in FOLLOWERS.items():
        base, lead = recipe_knobs.get(follower), recipe_knobs.get(leader)
        if follower in given or leader not in given or base is None or not lead or leader not in knobs:
            continue
        knobs[follower] = knobs[leader] * (base / lead)  # a 1 : 1 ratio gives the value itself


def recipe_settings(name: str, family: str = "") -> dict[str, Any]:
    """DistillConfig keyword arguments of `name` for a `family` teacher, plus `recipe=name`."""
    _, values = resolve(name, family)
    return {key: v.value for key, v in values.items()} | {"recipe": name}


def markdown_table() -> str:
    """The recipes side by side, each value with its source: the table of docs/recipes.md (a test keeps the two
    equal; regenerate with `python -c "from tdm_core.recipes import markdown_table; print(markdown_table())"`)."""
    names = list(RECIPES)
    keys = list(dict.fromkeys(key for name in names for key in RECIPES[name].values))
    lines = ["| knob | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = []
        for name in names:
            value = RECIPES[name].values.get(key)
            if value is None:
                cells.append("–")
                continue
            shown = ("= rank" if key == "lora_alpha" else "off") if value.value is None else (
                f"({value.value[0]}, {value.value[1]})" if isinstance(value.value, tuple) else f"{value.value}")
            cells.append(f"{shown} <sub>{value.source}</sub>")
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
