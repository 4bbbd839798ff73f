"""TDM Distill's training recipe: the `recipe` input, the advanced knob inputs, and how they become the job's
DistillConfig.

A knob at its "from the recipe" value (-1 for numbers, "recipe" for choices) takes the recipe's value
(tdm_core/recipes.py; `auto` is the teacher family's recipe, tdm_core/families.py); any other value overrides it, and the
job records which ones did. Inputs that predate the recipes (learning_rate, cfg, lora_rank, lora_alpha,
batch_size) follow the same rule, so workflows saved with explicit values keep training with them.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from tdm_core import recipes

FROM_RECIPE = -1
FROM_RECIPE_CHOICE = "recipe"
RECIPE_CHOICES = [recipes.AUTO, *recipes.RECIPES]
_NUMBER_HINT = " -1: the recipe's."


def recipe_input():
    return io.Combo.Input(
        "recipe", options=RECIPE_CHOICES, default=recipes.AUTO, optional=True,
        tooltip="Fills every setting left at -1 / 'recipe' from a TDM recipe. auto: the teacher family's (SD3 and "
                "SD3.5, SDXL, Flux: each the recipe measured on its toys; others: official_demo). Each recipe: the "
                "help page.")


def _number(name: str, tooltip: str, *, maximum: float, step: float):
    """A float knob whose -1 (its default) means "the recipe's"."""
    return io.Float.Input(name, optional=True, default=FROM_RECIPE, min=FROM_RECIPE, max=maximum, step=step,
                          round=False, tooltip=tooltip)


def _choice(name: str, options: list[str], tooltip: str):
    """A choice knob whose "recipe" (its default) means "the recipe's"."""
    return io.Combo.Input(name, optional=True, options=[FROM_RECIPE_CHOICE, *options], default=FROM_RECIPE_CHOICE,
                          tooltip=tooltip)


def knob_inputs() -> list:
    """The recipe knobs besides the older inputs, in the order they are appended to the node (saved workflows hold
    widget values by position: new widgets only ever go at the end). Optional, like `recipe`: a prompt in API format
    saved before they existed lacks them, and a missing one means "the recipe's"."""
    return [
        _number("student_learning_rate", "The student's learning rate. -1: the recipe's, scaled by learning_rate like "
                "the recipe's (official: a fifth of it).", maximum=1e-2, step=1e-6),
        _number("adam_beta1", "AdamW β1 of both networks (official 0, Flow-Factory 0.9)." + _NUMBER_HINT,
                maximum=0.9999, step=0.01),
        _number("adam_beta2", "AdamW β2 of both networks (official 0.95, Flow-Factory 0.999)." + _NUMBER_HINT,
                maximum=0.99999, step=0.001),
        _number("weight_decay", "AdamW weight decay of both networks." + _NUMBER_HINT, maximum=1.0, step=1e-4),
        _number("grad_clip_student", "Maximum gradient norm of the student; 0: not clipped." + _NUMBER_HINT,
                maximum=1e4, step=0.1),
        _number("grad_clip_fake", "Maximum gradient norm of the fake score; 0: not clipped (official)." + _NUMBER_HINT,
                maximum=1e4, step=0.1),
        _number("importance_clip", "Keeps the importance weight within [1/c, c]; 0: unclipped (official), "
                "Flow-Factory 20." + _NUMBER_HINT, maximum=1e6, step=1.0),
        _choice("tau_mode", ["separate", "shared", "reverse"],
                "Where the score comparison time τ is drawn: separate = inside each student step (official), shared = "
                "up to the grid's top, reverse = up to full noise (Flow-Factory)."),
        _choice("tau_density", ["uniform", "logit_normal"],
                "How τ is drawn there: uniform (official) or logit_normal over the noise level (Flow-Factory), with "
                "the two inputs below."),
        io.Float.Input("tau_logit_mean", optional=True, default=0.0, min=-5.0, max=5.0, step=0.1,
                       tooltip="Mean of the logit-normal τ density; used when tau_density is logit_normal."),
        io.Float.Input("tau_logit_std", optional=True, default=1.0, min=0.05, max=5.0, step=0.05,
                       tooltip="Standard deviation of the logit-normal τ density; used when tau_density is "
                               "logit_normal."),
        io.Int.Input("fake_updates", optional=True, default=FROM_RECIPE, min=FROM_RECIPE, max=16,
                     tooltip="Fake-score updates per student update." + _NUMBER_HINT),
        _choice("stages", ["one", "all", "last"], "Trajectory steps each update trains per sample: one at random "
                "(official), all K (Flow-Factory; K times the update's cost) or the last only (the earlier steps stay "
                "the teacher's)."),
        _choice("lr_decay", ["constant", "cosine"],
                "Both learning rates: constant (official) or a half cosine to 0 over the iterations."),
    ]


def recipe_name(settings: dict, family: str) -> str:
    """The recipe the job trains with: the one chosen, or for auto the teacher family's. A job records the name it
    resolved (its DistillConfig's `recipe`; `recipe_used` in records written before), so resuming it later keeps it
    even if auto's choice changed in between."""
    chosen = settings.get("recipe_used") or settings.get("recipe", recipes.AUTO)
    if chosen != recipes.AUTO:
        recipes.get_recipe(chosen)  # an unknown name from a record on disk is refused here
        return chosen
    return recipes.family_recipe(family)


def _set(value) -> bool:
    return value is not None and value != FROM_RECIPE and value != FROM_RECIPE_CHOICE


def distill_settings(settings: dict, family: str) -> tuple[dict, list[str], str]:
    """(DistillConfig keyword arguments of the recipe knobs, the knobs the node overrode as "name value" texts,
    the recipe's name) for a job's settings."""
    return resolve_knobs(settings, family)[:3]


def appended_knob_inputs() -> list:
    """The recipe knobs added after `frames` and `micro_batch`, in the order they are appended to the node (saved
    workflows hold widget values by position: each goes after every older widget); optional, the recipe's by
    default."""
    return [
        _number("student_ema", "Saves a moving average of the student's weights with this decay (e.g. 0.99) "
                "instead of its last ones; training continues from the weights themselves. 0: none (official)."
                + _NUMBER_HINT, maximum=0.9999, step=0.001),
        _choice("fake_samples", ["step", "output"],
                "What the fake score learns: step = the step each update draws (official); output = the student's "
                "own samples at every noise level, so it describes what the student samples (Flux: its students "
                "no longer end too narrow)."),
    ]


def resolve_knobs(settings: dict, family: str) -> tuple[dict, list[str], str, set[str]]:
    """`distill_settings`' three, and the DistillConfig fields the node sets itself (a value other than "the
    recipe's", whether or not it equals the recipe's): what an existing job's recipe values must not stand in for when
    the node is compared with that job. A value that only follows one set here (the student's rate, LoRA alpha:
    tdm_core.recipes.follow) is not among them: the job keeps its own (the leader is compared), so a job recorded
    before a follow rule existed, e.g. Flow-Factory's alpha 64 at a rank set on the node, still resumes with the scale
    its adapters were trained with."""
    name = recipe_name(settings, family)
    _, values = recipes.resolve(name, family)
    recipe_knobs = {key: v.value for key, v in values.items()}
    knobs = dict(recipe_knobs)
    changed: list[str] = []
    explicit: set[str] = set()

    def override(field: str, value) -> None:
        if knobs.get(field) != value:
            changed.append(f"{field} {value!r}")
        knobs[field] = value
        explicit.add(field)

    lr = settings.get("learning_rate", FROM_RECIPE)
    if _set(lr):
        override("lr", float(lr))
    if _set(settings.get("student_learning_rate")):
        override("student_lr", float(settings["student_learning_rate"]))
    for node_key, field, convert in (("cfg", "cfg", float), ("lora_rank", "lora_rank", int),
                                     ("batch_size", "batch_size", int), ("weight_decay", "weight_decay", float),
                                     ("fake_updates", "fake_updates", int), ("tau_mode", "tau_mode", str),
                                     ("stages", "stages", str), ("lr_decay", "lr_decay", str),
                                     ("student_ema", "student_ema", float),
                                     ("fake_samples", "fake_samples", str)):
        if _set(settings.get(node_key)):
            override(field, convert(settings[node_key]))
    alpha = settings.get("lora_alpha", FROM_RECIPE)
    if _set(alpha):
        override("lora_alpha", float(alpha) or None)  # 0: alpha = rank
    betas = list(knobs["adam_betas"])
    for index, node_key in enumerate(("adam_beta1", "adam_beta2")):
        if _set(settings.get(node_key)):
            betas[index] = float(settings[node_key])
    if tuple(betas) != tuple(knobs["adam_betas"]):
        override("adam_betas", tuple(betas))
    if _set(settings.get("adam_beta1")) or _set(settings.get("adam_beta2")):
        explicit.add("adam_betas")
    for node_key, field in (("grad_clip_student", "grad_clip"), ("grad_clip_fake", "grad_clip_fake"),
                            ("importance_clip", "importance_clip")):
        if _set(settings.get(node_key)):
            override(field, float(settings[node_key]) or None)  # 0: off
    if _set(settings.get("tau_density")):
        override("tau_density", settings["tau_density"])
        if settings["tau_density"] == "logit_normal":
            override("tau_logit_mean", float(settings.get("tau_logit_mean", 0.0)))
            override("tau_logit_std", float(settings.get("tau_logit_std", 1.0)))
    # the student's lr and LoRA alpha left to the recipe keep its ratios to a learning rate and rank set here
    recipes.follow(knobs, recipe_knobs, explicit)
    knobs["recipe"] = name
    return knobs, changed, name, explicit


def changed_fields(changes: list[str]) -> set[str]:
    """The DistillConfig fields of `changed` texts ("cfg 3.5": a field name, a space, the value's repr)."""
    return {text.split(" ", 1)[0] for text in changes}


def description(name: str, changed: list[str]) -> str:
    """One line for the job's panel, its status text and the LoRA's record: the recipe, its source, the changes."""
    recipe = recipes.get_recipe(name)
    text = f"{name} ({recipe.title})"
    return text + (f"; changed on the node: {', '.join(changed)}" if changed else "")
