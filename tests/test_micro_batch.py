"""`micro_batch`: an iteration's network passes take at most that many rows, and the update is the one of all rows
in one pass (gradients accumulated pass by pass), on every path: one or all stages, with and without the teacher's
guidance pass, uneven last passes, several processes' worth of rows, and the preview rollout."""

from __future__ import annotations

import pytest
import torch

from tdm_core.distill import ConfigError, DistillConfig, TDMTrainer
from tdm_core.distill.backend import slice_cond
from tdm_core.distill.reference import make_backend


def _config(**kw):
    base = dict(prompts=["a cat", "a dog", "a bird"], batch_size=4, total_steps=900, lora_rank=4, seed=3)
    base.update(kw)
    return DistillConfig(**base)


def _record_rows(trainer) -> list[int]:
    """Wraps the backend's forward to record the rows of every network pass."""
    rows, forward = [], trainer.backend.forward

    def recorded(x, t, cond, adapter):
        rows.append(x.shape[0])
        return forward(x, t, cond, adapter)

    trainer.backend.forward = recorded
    return rows


def _record_gradients(trainer, fake_from=None) -> dict[str, list[torch.Tensor]]:
    """Records each update's summed gradients just before its optimiser step; with `fake_from` (another trainer), the
    fake score's adapter is first set to that trainer's before the generator update."""
    grads, apply, generator_update = {}, trainer._apply_update, trainer.generator_update

    def recorded(loss, optimizer, scaler, params, clip, schedule):
        name = "fake" if optimizer is trainer.opt_fake else "student"
        grads[name] = [p.grad.detach().clone() for p in params]
        return apply(loss, optimizer, scaler, params, clip, schedule)

    def with_fake_from(*args):
        if fake_from is not None:
            trainer.backend.load_adapter_state_dict("fake", fake_from.backend.adapter_state_dict("fake"))
        return generator_update(*args)

    trainer._apply_update, trainer.generator_update = recorded, with_fake_from
    return grads


@pytest.mark.parametrize(("stages", "cfg", "micro_batch", "parametrisation"), [
    ("one", 2.0, 1, "eps"),     # the official draws, the guided teacher pass split in two
    ("one", 1.0, 3, "flow"),    # passes of 3 and 1 rows
    ("all", 2.0, 4, "v"),       # K = 4 rows per sample: 16 rows in passes of 4
    ("all", 1.0, 5, "flow"),    # passes that cut through a sample's steps
])
def test_the_update_in_passes_is_the_update_of_all_rows_at_once(stages, cfg, micro_batch, parametrisation):
    """Both updates' gradients (what the optimiser steps on) and metrics equal those of all rows in one pass.
    Compared within one iteration from the same weights: AdamW's first steps move every weight by ±lr whatever its
    gradient's size, so a gradient element at round-off level would flip a weight by 2·lr and later iterations
    would compare that, not the passes. The generator update gets the unsplit run's fake score, so it is compared
    on the same weights too."""
    # lr 1e-2 rather than the default 1e-4: the generator's target is the difference f − r of the fake score and the
    # teacher; after one update at 1e-4 it is ~1e-4 of their values, so each pass size's own float32 round-off
    # (~1e-7, batch-size-dependent kernels) would be ~1e-3 of it, and the comparison would measure only that
    settings = dict(stages=stages, cfg=cfg, lr=1e-2)
    whole = TDMTrainer(make_backend(parametrisation=parametrisation, lora_rank=4), _config(**settings))
    passes = TDMTrainer(make_backend(parametrisation=parametrisation, lora_rank=4),
                        _config(**settings, micro_batch=micro_batch))
    expected, actual = _record_gradients(whole), _record_gradients(passes, fake_from=whole)
    rows, whole_rows = _record_rows(passes), _record_rows(whole)
    a, b = whole.step(), passes.step()
    assert max(rows) <= micro_batch and len(rows) > len(whole_rows)  # more, smaller passes over the same rows
    for key in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen", "w_mean", "is_weight"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    for name in ("fake", "student"):
        scale = max(float(g.abs().max()) for g in expected[name])
        assert scale > 0  # the update has gradients to compare
        # 1e-4 of the largest element: the official pseudo-Huber's slope near zero is 1/c = 1000, so the generator's
        # gradient magnifies the passes' round-off in f − r (1e-7) a thousand times; a pass weighted wrongly, or a row
        # lost or counted twice, is off by a quarter of the gradient or more
        for got, want in zip(actual[name], expected[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale)
    for _ in range(3):  # and it goes on training, every pass within the bound
        metrics = passes.step()
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_fake", "loss_gen"))
    assert max(rows) <= micro_batch


def test_one_pass_per_update_without_micro_batch():
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(stages="all", cfg=2.0))
    rows = _record_rows(trainer)
    trainer.step()
    # the rollout (4 samples, as many student steps as the draws need), then the fake score's 16 rows, the student's,
    # the guided teacher's 2 × 16 and the fake score's again
    assert rows[-4:] == [16, 16, 32, 16] and set(rows[:-4]) == {4}


def test_previews_sample_in_passes():
    trainer = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4), _config(micro_batch=2))
    whole = TDMTrainer(make_backend(parametrisation="flow", lora_rank=4), _config())
    rows = _record_rows(trainer)
    prompts = ["a cat", "a dog", "a bird", "a cat", "a dog"]
    torch.testing.assert_close(trainer.sample(prompts, seed=1), whole.sample(prompts, seed=1), rtol=1e-5, atol=1e-6)
    assert rows == [2, 2, 1] * 4


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_micro_batch_must_be_a_count(value):
    with pytest.raises(ConfigError, match="micro_batch must be an integer"):
        _config(micro_batch=value).validate()


def test_a_record_without_micro_batch_runs_everything_in_one_pass():
    data = _config().to_dict()
    del data["micro_batch"]  # configs and job records written before the setting existed
    assert DistillConfig.from_dict(data).micro_batch == 0


def test_slice_cond_takes_the_same_rows_of_every_part():
    cond = {"context": torch.arange(12.0).reshape(4, 3), "pooled": (torch.arange(4.0), None), "none": None}
    part = slice_cond(cond, slice(1, 3))
    assert part["context"].tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert part["pooled"][0].tolist() == [1.0, 2.0] and part["pooled"][1] is None and part["none"] is None
    with pytest.raises(TypeError, match="cannot slice"):
        slice_cond({"bad": "text"}, slice(0, 1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_passes_in_half_precision(dtype):
    """The dtypes a GPU user trains in: a half-precision teacher under autocast (float16 with its loss scaling, each
    pass's loss scaled before its backward and the sum unscaled once) gives one iteration's gradients of the one-pass
    run, within half precision's round-off, and skips nothing."""
    settings = dict(stages="all", cfg=2.0, lr=1e-2, dtype=dtype)
    whole = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(**settings))
    passes = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config(**settings, micro_batch=2))
    expected, actual = _record_gradients(whole), _record_gradients(passes, fake_from=whole)
    a, b = whole.step(), passes.step()
    assert a["skipped_fake"] == b["skipped_fake"] == a["skipped_gen"] == b["skipped_gen"] == 0
    assert a.get("loss_scale") == b.get("loss_scale")  # float16: the same scale, no overflow in any pass
    for key in ("loss_fake", "loss_gen"):
        assert b[key] == pytest.approx(a[key], rel=1e-2), key
    for name in ("fake", "student"):
        scale = max(float(g.abs().max()) for g in expected[name])
        for got, want in zip(actual[name], expected[name], strict=True):
            # 1e-2 of the largest element: bf16 keeps 8 bits of mantissa, and the pass sizes round differently
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * scale)
