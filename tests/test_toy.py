"""The toy teacher task (tdm_core.toy): backend protocol, metric sanity, caching, and a short TDM run that must
improve the student's metric. Uses the 2-D Gaussian-mixture teacher (trains in seconds); the digits task is exercised
by `python -m tdm_core.demo` and `bench/distill.py`."""

from __future__ import annotations

import pytest
import torch

from tdm_core.distill import DistillConfig, TDMTrainer, TeacherBackend
from tdm_core.toy import (
    GMM_TEACHER,
    GaussianMixture2D,
    GMMMetric,
    ToyBackend,
    class_prompts,
    ddim_sample,
    frechet_distance,
    load_or_train_teacher,
    prompt_to_label,
    uniform_grid,
)
from tdm_core.toy import teacher as teacher_module
from tdm_core.toy.evaluate import ToyEvaluator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm_teacher():
    # The shipped GMM teacher, trained once per machine in the toy cache (TDM_TOY_CACHE, else ~/.cache/comfyui-tdm)
    # and shared by both ComfyUI runs of test.sh, as the SDXL/Flux toy teachers are.
    return load_or_train_teacher(GMM_TEACHER)


def test_cache_reuses_the_trained_teacher(tmp_path, monkeypatch):
    # The cache logic on a short-trained teacher in a fresh folder: the first call trains, the second must not.
    config = teacher_module.with_overrides(GMM_TEACHER, train_steps=20)
    trained = load_or_train_teacher(config, tmp_path)
    assert not trained.from_cache and trained.path.is_file()
    assert trained.path.parent == tmp_path and config.key() in trained.path.name

    def no_training(*args, **kwargs):
        raise AssertionError("a cached teacher must not be retrained")

    monkeypatch.setattr(teacher_module, "train_teacher", no_training)
    again = load_or_train_teacher(config, tmp_path)
    assert again.from_cache and again.path == trained.path
    for (name, a), (_, b) in zip(trained.net.state_dict().items(), again.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Another config is another file: the cache key covers every setting.
    assert teacher_module.teacher_path(teacher_module.with_overrides(config, seed=1), tmp_path) != trained.path
    assert teacher_module.teacher_path(GMM_TEACHER, tmp_path) != trained.path


def test_two_processes_missing_the_cache_at_once_train_it_once(tmp_path):
    # Parallel test workers (and the demo run beside the tests) share the toy cache: the second to ask waits for the
    # first one's file (tdm_core.toy.cache_lock) instead of training the same teacher again. Threads stand in for
    # processes here: each opens the lock file itself, and flock locks belong to the open file, not the process.
    import threading

    config = teacher_module.with_overrides(GMM_TEACHER, train_steps=200)
    start, results = threading.Barrier(2), []

    def ask():
        start.wait()
        results.append(load_or_train_teacher(config, tmp_path))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(result.from_cache for result in results) == [False, True]
    assert len({result.path for result in results}) == 1


def test_backend_satisfies_the_distill_protocol(gmm_teacher):
    backend = ToyBackend(gmm_teacher, lora_rank=4)
    assert isinstance(backend, TeacherBackend)
    assert backend.parametrisation == "eps" and backend.latent_shape == (2,)
    assert backend.schedule.num_timesteps == 1000
    cond = backend.encode(["0", "3", ""])
    assert cond.tolist() == [0, 3, gmm_teacher.config.num_classes]
    assert torch.equal(backend.uncond(2), torch.full((2,), gmm_teacher.config.num_classes))
    x, t = torch.randn(3, 2), torch.tensor([999, 500, 20])
    with torch.no_grad():
        outs = {a: backend.forward(x, t, cond, a) for a in ("teacher", "student", "fake")}
        direct = gmm_teacher.net(x, t, cond)
    # LoRA B starts at zero: student = fake = teacher = the cached network.
    for out in outs.values():
        assert out.shape == (3, 2)
        torch.testing.assert_close(out, direct)
    for adapter in ("student", "fake"):
        params = backend.trainable_parameters(adapter)
        assert params and all(p.requires_grad for p in params)
        state = backend.adapter_state_dict(adapter)
        assert state and all(".lora_" in k for k in state)
        backend.load_adapter_state_dict(adapter, {k: torch.ones_like(v) for k, v in state.items()})
    with torch.no_grad():
        moved = backend.forward(x, t, cond, "student")
        torch.testing.assert_close(backend.forward(x, t, cond, "teacher"), direct)
    assert not torch.allclose(moved, direct)
    with pytest.raises(ValueError, match="not a class label"):
        prompt_to_label("cat", 4)


def test_local_ddim_is_the_trainers_rollout(gmm_teacher):
    """toy.sampling.ddim_sample (the teacher baselines) and TDMTrainer.rollout (the student) take the same step."""
    backend = ToyBackend(gmm_teacher, lora_rank=4)
    trainer = TDMTrainer(backend, DistillConfig(prompts=class_prompts(4), steps=4, total_steps=1000, cfg=1.0))
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 4
    ours = ddim_sample(lambda x, t: gmm_teacher.net(x, t, labels), noise, uniform_grid(4), gmm_teacher.alphas_cumprod)
    theirs = trainer.sample([str(c) for c in labels.tolist()], noise=noise, adapter="teacher")
    assert trainer.grid == uniform_grid(4) == [999, 749, 499, 249]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_frechet_distance_sanity():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(a + s, a) for s in (0.1, 0.5, 1.0)]
    # A shift of the mean by s in each of 8 dimensions adds exactly 8 s².
    assert shifted == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-6)
    scaled = frechet_distance(a * 2.0, a)
    assert scaled > 1.0
    metric = GMMMetric()
    points, labels = GaussianMixture2D().sample_balanced(2000, torch.Generator().manual_seed(7))
    fd_true = metric.fd(points)
    assert fd_true < 0.5  # a fresh draw of the true mixture sits near its reference
    fds = [metric.fd(points + torch.tensor([s, 0.0])) for s in (0.1, 0.3, 0.6)]
    assert fd_true < fds[0] < fds[1] < fds[2]
    assert metric.accuracy(points, labels) > 0.99


def test_short_tdm_run_improves_the_gmm_student(gmm_teacher):
    evaluator = ToyEvaluator(gmm_teacher, samples_per_class=250)
    teacher_4 = evaluator.score(evaluator.teacher_samples(4))
    teacher_50 = evaluator.score(evaluator.teacher_samples(50))
    # The benchmark discriminates: the teacher's own 4-step DDIM is clearly worse than its 50 steps.
    assert teacher_4["fd"] > 2 * teacher_50["fd"]
    backend = ToyBackend(gmm_teacher, lora_rank=8)
    config = DistillConfig(prompts=class_prompts(4), steps=4, total_steps=1000, cfg=1.0, lr=1e-3, batch_size=128,
                           iterations=80, seed=0)
    trainer = TDMTrainer(backend, config)
    start = evaluator.score(evaluator.student_samples(trainer))
    assert start["fd"] == pytest.approx(teacher_4["fd"], rel=1e-4)  # untrained student = teacher's 4-step sampler
    trainer.train()
    end = evaluator.score(evaluator.student_samples(trainer))
    assert end["fd"] < 0.7 * start["fd"], (start, end, teacher_50)
