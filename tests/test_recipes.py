"""Training recipes as data (tdm_core/recipes.py) and the trainer knobs they set: τ's interval and density, the
importance-weight clip, the fake score's gradient clip, fake updates per student update, all trajectory steps per
update, and the student's own learning rate."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from tdm_core import families, recipes
from tdm_core.distill import ConfigError, DistillConfig, TDMTrainer, losses
from tdm_core.distill.reference import make_backend


def _config(**kw):
    base = dict(prompts=["a cat", "a dog", "a bird"], batch_size=4, total_steps=900, lora_rank=4, seed=3)
    base.update(kw)
    return DistillConfig(**base)


def test_every_recipe_value_is_a_valid_knob_with_a_source():
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for recipe in recipes.RECIPES.values():
        assert set(recipe.values) <= fields, recipe.name
        for key, value in recipe.values.items():
            assert value.source in recipes.SOURCES, (recipe.name, key)
            if value.source == "here":
                assert value.why, f"{recipe.name}.{key}: a departure from the sources says why"
        DistillConfig(prompts=["x"], **recipe.settings()).validate(num_timesteps=1000)
        assert recipe.cited().count("\n") == len(recipe.values) - 1
    for family in families.FAMILIES.values():
        assert family.training_recipe in recipes.RECIPES, family.name


def test_the_official_recipe_is_the_trainers_default_and_keeps_the_official_draws():
    """Naming the official recipe changes nothing: same optimisers, same draws, same numbers."""
    a, b = make_backend(parametrisation="eps", lora_rank=4), make_backend(parametrisation="eps", lora_rank=4)
    plain = TDMTrainer(a, _config())
    # only what is not a recipe knob, and the test's small rank: the recipe fills the rest
    named = TDMTrainer(b, DistillConfig.from_dict(dict(prompts=["a cat", "a dog", "a bird"], batch_size=4,
                                                       total_steps=900, lora_rank=4, seed=3, recipe="official_demo")))
    assert named.config.recipe == "official_demo"
    for _ in range(2):
        one, two = plain.step(), named.step()
        assert one["loss_gen"] == two["loss_gen"] and one["loss_fake"] == two["loss_fake"]
    assert plain.opt_gen.param_groups[0]["lr"] == pytest.approx(named.opt_gen.param_groups[0]["lr"])


def test_a_recipe_fills_only_what_the_config_leaves_out():
    config = DistillConfig.from_dict({"prompts": ["a"], "recipe": "flow_factory_sd35", "lr": 3e-5})
    assert config.lr == 3e-5 and config.student_lr == 3e-5  # the recipe's 1 : 1 rates kept (recipes.follow)
    assert config.adam_betas == (0.9, 0.999) and config.importance_clip == 20.0 and config.stages == "all"
    assert DistillConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown TDM training recipe 'nope'"):
        DistillConfig.from_dict({"prompts": ["a"], "recipe": "nope"})
    # a family's overrides win over the recipe (Flux-dev cannot take a second, unguided pass)
    assert DistillConfig.from_dict({"prompts": ["a"], "recipe": "official_readme", "family": "flux"}).cfg == 1.0


def test_a_rate_or_rank_set_alone_keeps_the_recipes_ratios_headless_and_on_the_node(pack):
    """A run that sets the fake score's lr or the LoRA rank and leaves the student's lr or alpha to the recipe keeps
    the recipe's student/fake rate ratio and its adapter scale alpha / rank, in a headless config as on TDM Distill."""
    def headless(**data):
        return DistillConfig.from_dict({"prompts": ["a"], **data})

    ff = headless(recipe="flow_factory_sd35", lora_rank=8)
    assert (ff.lora_rank, ff.lora_alpha) == (8, 16.0)  # Flow-Factory's scale 2 (32 / 64), not 64 / 8
    assert headless(recipe="flow_factory_sd35", lora_rank=8, lora_alpha=8.0).lora_alpha == 8.0  # set: kept
    assert headless(recipe="flow_factory_sd35", lora_alpha=16.0).lora_rank == 32
    assert headless(recipe="official_demo", lr=1e-3).student_lr == pytest.approx(2e-4)  # the demo's fifth
    assert headless(recipe="official_demo", lr=1e-3, student_lr=5e-5).student_lr == 5e-5
    assert headless(recipe="auto", family="sd3", lr=5e-4).student_lr == pytest.approx(5e-4)  # equal rates
    assert headless(recipe="official_demo", lora_rank=8).lora_alpha is None  # alpha = rank follows by itself
    assert headless(lr=1e-3).student_lr is None  # no recipe: generator_lr_scale, as before recipes existed

    recipe_inputs = sys.modules[f"{pack.__name__}.nodes.recipe_inputs"]
    knobs, changed, name, explicit = recipe_inputs.resolve_knobs(
        {"recipe": "flow_factory_sd35", "lora_rank": 8, "lora_alpha": -1.0, "learning_rate": 2e-5}, "sd35")
    assert (knobs["lora_rank"], knobs["lora_alpha"], knobs["lr"], knobs["student_lr"]) == (8, 16.0, 2e-5, 2e-5)
    assert changed == ["lr 2e-05", "lora_rank 8"]  # what follows is not a change of its own
    assert {"lr", "lora_rank"} <= explicit and not {"lora_alpha", "student_lr"} & explicit  # nor a setting
    # a job recorded before the rule (alpha 64 at rank 8) resumes with its own alpha: its rank is what is compared
    distill_jobs = sys.modules[f"{pack.__name__}.nodes.distill_jobs"]
    node = {"recipe": "flow_factory_sd35", "lora_rank": 8, "steps": 4, "seed": 0, "iterations": 10, "keep_last": 1,
            "width": 64, "height": 64, "grid": "auto", "unconditional_prompt": "", "dtype": "auto",
            "offload": "none", "gradient_checkpointing": False}
    old = distill_jobs.settings_from_inputs(node, ["a"], "sd35")
    old.config.lora_alpha = 64.0  # as the record of a job started before recipes.follow says
    again = distill_jobs.settings_from_inputs(node, ["a"], "sd35", recorded=old)
    assert again.config.lora_alpha == 64.0 and again.config.to_dict() == old.config.to_dict()
    rank_edited = distill_jobs.settings_from_inputs(dict(node, lora_rank=16), ["a"], "sd35", recorded=old)
    assert rank_edited.config.lora_rank == 16  # an edit of the leader still shows (and is refused by the caller)
    knobs = recipe_inputs.resolve_knobs({"recipe": "flow_factory_sd35", "lora_rank": 8, "lora_alpha": 0.0}, "sd35")[0]
    assert knobs["lora_alpha"] is None  # 0 on the node: alpha = rank
    # student_ema, the widget after micro_batch: -1 keeps the recipe's (SD3's auto: 0.99), 0 turns the average off
    assert recipe_inputs.resolve_knobs({"recipe": "auto", "student_ema": -1.0}, "sd3")[0]["student_ema"] == 0.99
    knobs, changed, _, explicit = recipe_inputs.resolve_knobs({"recipe": "auto", "student_ema": 0.0}, "sd3")
    assert knobs["student_ema"] == 0.0 and changed == ["student_ema 0.0"] and "student_ema" in explicit
    ema_job = distill_jobs.settings_from_inputs(dict(node, recipe="official_demo", student_ema=0.995), ["a"], "sd35")
    assert ema_job.config.student_ema == 0.995 and ema_job.comfy["recipe_changes"] == ["lora_rank 8", "student_ema 0.995"]
    below = distill_jobs.settings_from_inputs(dict(node, student_ema=-0.5), ["a"], "sd35")  # in the widget's range
    with pytest.raises(ConfigError, match="student_ema must be 0"):  # refused where every job's config is validated
        below.config.validate()


def test_fake_samples_on_the_node_keeps_the_recipes_or_overrides_it(pack):
    """fake_samples, the widget after student_ema: "recipe" keeps the recipe's (Flux's auto: output, the official
    demo's: step); a choice overrides it and is recorded as a change; a value outside the choices (ComfyUI 0.3.75 does
    not check V3 combo values) is refused where every job's config is validated."""
    recipe_inputs = sys.modules[f"{pack.__name__}.nodes.recipe_inputs"]
    distill_jobs = sys.modules[f"{pack.__name__}.nodes.distill_jobs"]
    assert recipe_inputs.resolve_knobs({"recipe": "auto", "fake_samples": "recipe"}, "flux")[0]["fake_samples"] == "output"
    assert recipe_inputs.resolve_knobs({"recipe": "auto"}, "sdxl")[0]["fake_samples"] == "step"  # saved before it
    knobs, changed, _, explicit = recipe_inputs.resolve_knobs({"recipe": "auto", "fake_samples": "step"}, "flux")
    assert knobs["fake_samples"] == "step" and changed == ["fake_samples 'step'"] and "fake_samples" in explicit
    node = {"recipe": "official_demo", "steps": 4, "seed": 0, "iterations": 10, "keep_last": 1, "width": 64,
            "height": 64, "grid": "auto", "unconditional_prompt": "", "dtype": "auto", "offload": "none",
            "gradient_checkpointing": False}
    job = distill_jobs.settings_from_inputs(dict(node, fake_samples="output"), ["a"], "sd15")
    assert job.config.fake_samples == "output" and job.comfy["recipe_changes"] == ["fake_samples 'output'"]
    bogus = distill_jobs.settings_from_inputs(dict(node, fake_samples="final"), ["a"], "sd15")
    with pytest.raises(ConfigError, match="fake_samples must be one of"):
        bogus.config.validate()


@pytest.mark.parametrize("overrides, message", [
    ({"tau_density": "gaussian"}, "tau_density must be one of"),
    ({"tau_logit_std": 0.0}, "tau_logit_std must be > 0"),
    ({"importance_clip": 1.0}, "importance_clip must be > 1"),
    ({"grad_clip_fake": 0.0}, "grad_clip_fake must be > 0"),
    ({"fake_updates": 0}, "fake_updates must be an integer in"),
    ({"stages": "some"}, "stages must be one of"),
    ({"fake_samples": "final"}, "fake_samples must be one of"),
    ({"student_lr": -1e-5}, "student_lr must be > 0"),
    ({"tau_mode": "forward"}, "tau_mode must be one of"),
])
def test_impossible_knobs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides).validate()


def _tau_draws(config, n=20000):
    trainer = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4), config)
    trainer.config.batch_size = n  # only the draws: no network runs
    trainer.local_batch = n
    return trainer, trainer._draw_segment()


def test_reverse_interval_reaches_the_end_of_the_schedule_and_separate_stays_below_the_step():
    trainer, draw = _tau_draws(_config(tau_mode="reverse"))
    n = trainer.num_timesteps
    assert int(draw["tau"].max()) == n - 1 and bool((draw["tau"] >= torch.clamp(draw["t_mid"], min=20)).all())
    _, draw = _tau_draws(_config())
    assert bool((draw["tau"] < draw["t_g"] - 10).all())


def test_logit_normal_tau_follows_the_truncated_density():
    """τ's flow-equivalent level s = σ/(α+σ) must follow the logit-normal truncated to each step's interval: its
    CDF, checked at the interval's quartiles of the exact truncated distribution (Kolmogorov-Smirnov style)."""
    config = _config(tau_mode="reverse", tau_density="logit_normal", tau_logit_mean=0.5, tau_logit_std=0.8)
    trainer, draw = _tau_draws(config)
    s_table = (trainer.sigmas / (trainer.alphas + trainer.sigmas))
    normal = torch.distributions.Normal(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64))
    for j in range(len(trainer.grid)):
        rows = draw["j"] == j
        taus = draw["tau"][rows]
        lo, hi = max(20, trainer.mids[j]), trainer.num_timesteps
        assert int(taus.min()) >= lo and int(taus.max()) < hi
        cdf_lo, cdf_hi = (normal.cdf(torch.logit(s_table[t].clamp(1e-12, 1 - 1e-12))) for t in (lo, hi - 1))
        for q in (0.25, 0.5, 0.75):
            # the exact truncated distribution's q-quantile level, and the share of draws at or below its timestep
            level = torch.sigmoid(normal.icdf(cdf_lo + q * (cdf_hi - cdf_lo)))
            t_q = int(torch.searchsorted(s_table, level))
            share = float((taus <= t_q).double().mean())
            assert abs(share - q) < 0.03, (j, q, share)


def test_importance_clip_bounds_the_log_weight_and_none_is_the_official_weight():
    torch.manual_seed(0)
    z = torch.randn(64, 16)
    m = 3.0 * torch.randn(64, 16)  # far from z: weights far from 1
    official = losses.importance_weight(m, z)
    assert float(official.min()) < 1 / 20
    clipped = losses.importance_weight(m, z, clip=20.0)
    assert float(clipped.min()) == pytest.approx(1 / 20) and float(clipped.max()) <= 20 + 1e-4
    inside = (official > 1 / 20) & (official < 20)
    torch.testing.assert_close(clipped[inside], official[inside])


def test_fake_gradient_clip_bounds_adams_first_moment():
    """With betas (0.9, ·), one AdamW step leaves exp_avg = 0.1 · g: its norm is at most 0.1 × the clip."""
    norms = {}
    for clip in (None, 1e-3):
        trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4),
                             _config(adam_betas=(0.9, 0.999), grad_clip_fake=clip))
        metrics = trainer.step()
        moments = [trainer.opt_fake.state[p]["exp_avg"] for p in trainer.fake_params]
        norms[clip] = float(torch.nn.utils.get_total_norm(moments))
        assert metrics["grad_norm_fake"] > 1e-3  # the norm before clipping is reported
    assert norms[1e-3] <= 1e-4 * (1 + 1e-4)
    assert norms[None] > 10 * norms[1e-3]


def test_fake_updates_and_student_lr():
    trainer = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), _config(fake_updates=3, student_lr=7e-6))
    for _ in range(2):
        metrics = trainer.step()
    assert int(trainer.opt_fake.state[trainer.fake_params[0]]["step"]) == 6
    assert int(trainer.opt_gen.state[trainer.student_params[0]]["step"]) == 2
    assert metrics["lr_gen"] == pytest.approx(7e-6) and metrics["lr_fake"] == pytest.approx(1e-4)


def test_all_stages_train_every_step_of_every_sample():
    trainer = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4), _config(stages="all"))
    draw = trainer._draw_segment()
    k, b = len(trainer.grid), trainer.local_batch
    assert draw["j"].tolist() == list(range(k)) * b
    assert draw["sample"].tolist() == [i for i in range(b) for _ in range(k)]
    assert draw["z"].shape[0] == b * k
    metrics = trainer.step()
    assert metrics["student_steps"] == k  # every step's state is needed
    assert all(math.isfinite(metrics[key]) for key in ("loss_fake", "loss_gen"))


def test_last_stage_trains_the_last_step_of_every_sample_only():
    """stages "last": every row of every draw (the fake score's and the student's) is the sample's last step, whose
    state needs the whole rollout; the student's gradient comes from its evaluation at the last grid time alone."""
    backend = make_backend(parametrisation="flow", lora_rank=4)
    trainer = TDMTrainer(backend, _config(stages="last", batch_size=3))
    k, last = len(trainer.grid), trainer.grid[-1]
    for _ in range(3):
        draw = trainer._draw_segment()
        assert draw["j"].tolist() == [k - 1] * 3 and draw["sample"].tolist() == [0, 1, 2]
        assert draw["t_g"].tolist() == [last] * 3 and draw["j_max"] == k - 1
    graded = []
    forward = backend.forward

    def recording(x, t, cond, adapter):
        if adapter == "student" and torch.is_grad_enabled():
            graded.append(sorted(set(t.tolist())))
        return forward(x, t, cond, adapter)

    backend.forward = recording
    metrics = trainer.step()
    assert metrics["student_steps"] == k  # the last step's state needs every step before it
    assert graded == [[last]]  # one student pass with gradients, at the last step's time only
    assert all(math.isfinite(metrics[key]) for key in ("loss_fake", "loss_gen"))


def test_the_docs_table_is_the_data():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    start = text.index("-->", text.index("<!-- recipes-table")) + 3
    assert text[start:text.index("<!-- /recipes-table -->")].strip() == recipes.markdown_table()


def test_cosine_decay_takes_both_learning_rates_to_zero_over_the_run(tmp_path):
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(lr_decay="cosine", iterations=4))
    seen = [(m["lr_fake"], m["lr_gen"]) for m in (trainer.step() for _ in range(4))]
    # after update s the rate is base · ½(1 + cos(π s / 4)): 0.854, 0.5, 0.146, 0 of it
    for (fake, gen), s in zip(seen, range(1, 5), strict=True):
        factor = 0.5 * (1 + math.cos(math.pi * s / 4))
        assert fake == pytest.approx(1e-4 * factor, abs=1e-9) and gen == pytest.approx(2e-5 * factor, abs=1e-9)
    # a resumed run continues the decay where it was
    state = trainer.state_dict()
    again = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(lr_decay="cosine", iterations=4))
    again.load_state_dict(state)
    assert again.opt_fake.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # a resume for more iterations stretches the decay over them from the restored step on, its first update included
    # (a ComfyUI job resumed for more iterations and a headless --resume --iterations N both build the trainer so)
    longer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(lr_decay="cosine", iterations=8))
    longer.load_state_dict(state)
    assert longer.opt_fake.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5, abs=1e-12)  # ½(1 + cos(π 4/8))
    assert longer.opt_gen.param_groups[0]["lr"] == pytest.approx(2e-5 * 0.5, abs=1e-12)
    first = longer.step()
    assert (first["lr_fake"], first["lr_gen"]) == pytest.approx((1e-4 * 0.5 * (1 + math.cos(math.pi * 5 / 8)),
                                                                  2e-5 * 0.5 * (1 + math.cos(math.pi * 5 / 8))))
    with pytest.raises(ConfigError, match="lr_decay must be one of"):
        _config(lr_decay="linear").validate()


def test_a_headless_config_takes_recipe_auto_as_the_node_does():
    """recipe = "auto" in a run.toml resolves to the teacher family's recipe, with the family's overrides."""
    flux = DistillConfig.from_dict({"prompts": ["x"], "family": "flux", "recipe": "auto"})
    assert flux.recipe == families.FAMILIES["flux"].training_recipe and flux.cfg == 1.0
    plain = DistillConfig.from_dict({"prompts": ["x"], "recipe": "auto"})  # no family: the official demo's
    assert plain.recipe == recipes.DEFAULT_RECIPE
    assert DistillConfig.from_dict({"prompts": ["x"], "family": "sd3", "recipe": "auto", "cfg": 3.0}).cfg == 3.0


def test_each_family_trains_with_the_recipe_measured_for_it():
    """recipe auto (bench/pace.py's toys, tdm_core/recipes.py): SD3-medium and SD3.5-medium with Flow-Factory's equal
    rates, τ and LoRA shape on the demo's optimiser, training the last step only with both rates cosine-decayed and
    saving the student's moving average (0.99); SDXL and Flux-dev at equal rates decayed along a cosine, SDXL with no
    average, Flux-dev with its fake score fitted to the student's output and an average (0.995); every other family with the official demo (the student at a fifth, its last weights). The trainer's two optimisers
    get those rates."""
    def auto(family: str, **data) -> DistillConfig:
        return DistillConfig.from_dict({"prompts": ["x"], "family": family, "recipe": "auto", **data})

    for family in ("sd3", "sd35"):
        config = auto(family)
        assert config.recipe == "official_demo_ff_tau_lora_last_cosine_ema" and config.student_ema == 0.99
        assert config.student_learning_rate() == config.lr == 1e-4
        assert (config.lora_rank, config.lora_alpha, config.tau_mode, config.tau_density) == (
            32, 64.0, "reverse", "logit_normal")
        assert (config.adam_betas, config.stages, config.lr_decay, config.cfg) == ((0.0, 0.95), "last", "cosine", 2.0)
    for family, recipe, average, fake_samples in (
            ("sdxl", "official_demo_equal_rates_cosine", 0.0, "step"),
            ("flux", "official_demo_equal_rates_cosine_fake_output_ema", 0.995, "output")):
        config = auto(family)
        assert config.recipe == recipe and config.lr_decay == "cosine"
        assert (config.student_ema, config.fake_samples, config.stages) == (average, fake_samples, "one")
        assert config.student_learning_rate() == config.lr == 1e-4 and config.lora_rank == 16
    assert auto("flux").cfg == 1.0  # the family's override still wins
    for family in ("sd15", "wan21", "cogvideox"):
        config = auto(family)
        assert config.recipe == "official_demo" and config.student_learning_rate() == pytest.approx(config.lr / 5)
        assert config.student_ema == 0.0 and config.fake_samples == "step"
    trainer = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4),
                         auto("sd3", total_steps=900, lora_rank=4))
    assert trainer.config.lora_alpha == 8.0  # rank 4 keeps the recipe's scale 2
    assert trainer.opt_gen.param_groups[0]["lr"] == trainer.opt_fake.param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("stages", ["one", "all"])
def test_output_fake_samples_fit_the_fake_score_to_the_students_output_at_every_noise_level(stages):
    """fake_samples "output": every row of a fake update's draw is its sample's last step (the student's output,
    t_mid the last step's 0), τ anywhere from 20 to the schedule's end, far above the last step's own interval, while
    the generator's draws stay the stage draws. Under "step" (official) a fake update draws exactly as the generator."""
    n = 4000
    trainer, fake_draw = _tau_draws(_config(stages=stages, fake_samples="output"), n)
    fake_draw = trainer._draw_segment(fake=True)
    k, last = len(trainer.grid), trainer.grid[-1]
    rows = n * (k if stages == "all" else 1)
    assert fake_draw["j"].tolist() == [k - 1] * rows and fake_draw["j_max"] == k - 1
    assert fake_draw["t_g"].tolist() == [last] * rows and fake_draw["t_mid"].tolist() == [trainer.mids[-1]] * rows
    taus = fake_draw["tau"]
    assert int(taus.min()) >= 20 and int(taus.max()) < trainer.num_timesteps
    assert float((taus >= last).double().mean()) > 0.5  # uniform over [20, N): most of it above the last step
    gen_draw = trainer._draw_segment()
    assert set(gen_draw["j"].tolist()) == set(range(k)) and bool((gen_draw["tau"] < gen_draw["t_g"] - 10).all())
    official, same = (_tau_draws(_config(stages=stages), n)[0] for _ in range(2))
    as_fake, as_gen = official._draw_segment(fake=True), same._draw_segment()
    assert all(torch.equal(as_fake[key], as_gen[key]) for key in ("j", "t_g", "t_mid", "tau", "z", "sample"))


def test_output_fake_samples_train_and_record_in_the_config():
    trainer = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4), _config(fake_samples="output"))
    metrics = trainer.step()
    assert metrics["student_steps"] == len(trainer.grid)  # the output needs the whole rollout
    assert all(math.isfinite(metrics[key]) for key in ("loss_fake", "loss_gen"))
    assert DistillConfig.from_dict(trainer.config.to_dict()).fake_samples == "output"
