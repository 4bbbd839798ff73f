"""Impossible distillation settings are clear errors before any compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tdm_core.distill import ConfigError, DistillConfig, TDMTrainer
from tdm_core.distill.reference import make_backend

REPO = Path(__file__).resolve().parents[1]


def _config(**kw):
    base = dict(prompts=["a cat"], total_steps=900)
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "steps (K) must be an integer ≥ 1"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1e-4), "lr must be > 0"),
        (dict(cfg=0.5), "cfg must be ≥ 1"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(tau_mode="both"), "tau_mode must be one of"),
        (dict(generator_loss="l1"), "generator_loss must be one of"),
        (dict(timesteps=[999, 856, 665]), "timesteps lists 3 grid points but steps (K) is 4"),
        (dict(timesteps=[999, 665, 856, 399]), "strictly descending"),
        (dict(batch_size=0), "batch_size must be ≥ 1"),
        (dict(adam_betas=(0.0, 1.5)), "adam_betas"),
        (dict(parallel="zero3"), "parallel must be one of ('ddp', 'fsdp'), got 'zero3'"),
        (dict(parallel="fsdp", mode="full"), "parallel 'fsdp' shards the teacher and its two LoRA adapters: it needs "
                                             "mode 'lora'"),
        (dict(parallel="fsdp", dtype="float16"), "parallel 'fsdp' with dtype float16"),
        (dict(student_ema=1.0), "student_ema must be 0 (no average) or a decay in (0, 1)"),
        (dict(student_ema=-0.5), "student_ema must be 0 (no average) or a decay in (0, 1)"),
        (dict(student_ema=float("nan")), "student_ema must be 0"),
        (dict(student_ema="0.99"), "student_ema must be 0"),
    ],
)
def test_static_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(**overrides).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(timesteps=[1200, 900, 600, 300]), "does not fit the teacher schedule"),
        (dict(total_steps=1500), "exceeds the teacher schedule's 1000 timesteps"),
        (dict(total_steps=100, steps=8), "the τ range"),  # Δ = 12: segments too short for the margins
        (dict(timesteps=[999, 856, 665, 25]), "the τ range"),  # last step below τ ≥ 20 + margin
        (dict(timesteps=[999, 980, 665, 399], randmid=True), "randmid needs"),
    ],
)
def test_grid_errors_against_schedule(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides).validate(num_timesteps=1000)


def test_errors_come_before_any_compute():
    backend = make_backend(parametrisation="eps")
    calls = []
    original = backend.forward
    backend.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(ConfigError, match="does not fit"):
        TDMTrainer(backend, _config(timesteps=[1999, 999, 500, 250]))
    assert calls == []


def test_valid_grids_and_mids():
    c = _config().validate(num_timesteps=1000)
    assert c.grid() == [899, 674, 449, 224]
    assert c.mid_timesteps() == [675, 450, 225, 0]  # t_g − Δ + 1
    c = _config(total_steps=800).validate(num_timesteps=1000)
    assert c.grid() == [799, 599, 399, 199]
    c = _config(timesteps=[999, 856, 665, 399]).validate(num_timesteps=1000)
    assert c.mid_timesteps() == [857, 666, 400, 0]


def test_load_json_toml_and_unknown_keys(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"prompts": ["x"], "steps": 2, "adam_betas": [0.0, 0.9]}))
    c = DistillConfig.load(tmp_path / "a.json")
    assert c.steps == 2 and c.adam_betas == (0.0, 0.9)
    (tmp_path / "b.toml").write_text('[distill]\nprompts = ["x", "y"]\ncfg = 4.5\ntau_mode = "shared"\n')
    c = DistillConfig.load(tmp_path / "b.toml")
    assert c.prompts == ["x", "y"] and c.cfg == 4.5 and c.tau_mode == "shared"
    assert DistillConfig.from_dict(c.to_dict()) == c
    (tmp_path / "c.json").write_text(json.dumps({"prompts": ["x"], "learning_rate": 1e-4}))
    with pytest.raises(ConfigError, match="unknown config keys \\['learning_rate'\\]"):
        DistillConfig.load(tmp_path / "c.json")


def test_cli_exits_2_on_config_error_before_building_the_teacher(tmp_path):
    config = {"prompts": [], "teacher": {"factory": "nonexistent.module:make"}, "output_dir": str(tmp_path / "o")}
    (tmp_path / "bad.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(tmp_path / "bad.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "prompts is empty" in proc.stderr
    assert not (tmp_path / "o").exists()
