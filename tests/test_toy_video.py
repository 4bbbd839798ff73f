"""The toy video teachers (tdm_core/toy/video.py): the exact ε, the criterion on exact data, the CLI factory, a short
TDM run through the real trainer on the exact teacher (the 4-step student beats the teacher's own 4 steps on
per-frame quality and the joint clip distance; not on consistency), and a small learned teacher: trained into the
cache once, the LoRAs on its own linears, its 50 steps more consistent than its 4. (That the student of the full
learned teacher beats its 4 steps on consistency too takes minutes: bench/video_toy.py --teacher learned.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tdm_core.distill import DistillConfig, TDMTrainer
from tdm_core.distill.cli import build_backend
from tdm_core.toy import video
from tdm_core.toy.mixture_spec import posterior_mean

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = video.TOY_VIDEO


@pytest.fixture(scope="module")
def reference():
    labels = video.balanced_labels(SPEC, 4096)
    return SPEC.sample(labels, torch.Generator().manual_seed(1234)), labels


def test_clips_move_by_the_prompts_velocity():
    centres = SPEC.class_centres(1).reshape(SPEC.positions, SPEC.frames, SPEC.side, SPEC.side)
    for f in range(SPEC.frames - 1):  # prompt "1" moves one column right per frame
        torch.testing.assert_close(torch.roll(centres[:, f], 1, dims=-1), centres[:, f + 1])
    assert not torch.equal(SPEC.class_centres(0), SPEC.class_centres(1))


def test_base_network_is_the_exact_teacher_per_prompt():
    net = video.VideoEpsNet(SPEC)
    x = torch.randn(8, *SPEC.shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((8,), 600)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 4])  # 4: the null class, every prompt's mixture
    abar = float(net.alphas_cumprod[600])
    a, s = abar**0.5, (1 - abar) ** 0.5
    flat = x.reshape(8, -1).double()
    for i, label in enumerate(labels.tolist()):
        centres, logw = SPEC.centres_and_log_weights(label)
        x0 = posterior_mean(flat[i : i + 1], a, s, centres, logw, SPEC.std)
        expected = ((flat[i : i + 1] - a * x0) / s).float().reshape(SPEC.shape)
        torch.testing.assert_close(net(x, t, labels)[i], expected, rtol=1e-5, atol=1e-5)


def test_criterion_on_data_and_on_a_scrambled_clip(reference):
    clips, ref_labels = reference
    labels = video.balanced_labels(SPEC, 512)
    data = SPEC.sample(labels, torch.Generator().manual_seed(7))
    scores = video.video_scores(SPEC, data, labels, clips, ref_labels)
    assert scores["track_consistent"] > 0.99 and scores["frame_on_mode"] > 0.99
    assert scores["motion_residual"] == pytest.approx(2 * SPEC.std**2, rel=0.05)
    # the same frames with their order shuffled across clips: per-frame quality unchanged, consistency gone
    scrambled = data.clone()
    for f in range(SPEC.frames):
        scrambled[:, f] = data[torch.randperm(512, generator=torch.Generator().manual_seed(f)), f]
    bad = video.video_scores(SPEC, scrambled, labels, clips, ref_labels)
    assert bad["frame_w2"] == pytest.approx(scores["frame_w2"], abs=1e-9)
    # (sliced W2 over 144-D clips sees broken correlations only weakly: measured 1.37× the data's)
    assert bad["track_consistent"] < 0.1 and bad["clip_w2"] > 1.2 * scores["clip_w2"]


def test_cli_factory_builds_the_video_backend():
    config = video.video_distill_config(lora_rank=4, teacher={"factory": "tdm_core.toy.video:make_backend"})
    backend = build_backend(config)
    assert isinstance(backend, video.VideoBackend) and backend.latent_shape == SPEC.shape and backend.lora_rank == 4
    with pytest.raises(TypeError, match="unexpected arguments"):
        video.make_backend(None, target="x")
    with pytest.raises(ValueError, match="teacher must be one of"):
        video.make_backend(None, teacher="trained")


def test_tdm_student_beats_the_teachers_own_four_steps(reference):
    clips, ref_labels = reference
    labels = video.balanced_labels(SPEC, 512)
    noise = torch.randn(512, *SPEC.shape, generator=torch.Generator().manual_seed(0))
    teacher4 = video.video_scores(SPEC, video.teacher_samples(SPEC, noise, labels, 4), labels, clips, ref_labels)
    config = video.video_distill_config(iterations=100)
    assert isinstance(config, DistillConfig)
    trainer = TDMTrainer(video.make_backend(config), config)
    start = video.video_scores(SPEC, trainer.sample([str(int(k)) for k in labels], noise=noise), labels, clips,
                               ref_labels)
    # before training the student IS the teacher's 4-step sampler (B = 0 adapters, the same grid and step)
    assert start["frame_w2"] == pytest.approx(teacher4["frame_w2"], rel=1e-3)
    trainer.train()
    student = video.video_scores(SPEC, trainer.sample([str(int(k)) for k in labels], noise=noise), labels, clips,
                                 ref_labels)
    print(f"toy video: teacher-4 {teacher4}, student after 100 TDM iterations {student}")
    assert student["frame_w2"] < 0.95 * teacher4["frame_w2"]
    assert student["clip_w2"] < 0.95 * teacher4["clip_w2"]


# A learned teacher small enough to train inside the test run (~30 s of one core, then cached like the toy teachers):
# it has learned part of the data (measured, 1024 clips: 50 steps track_consistent 0.29, 4 steps 0.19).
TINY_TEACHER = video.VideoTeacherConfig(channels=32, depth=2, train_steps=800, batch_size=128)


@pytest.fixture(scope="module")
def tiny_teacher():
    return video.load_or_train_video_teacher(TINY_TEACHER)


def test_learned_teacher_trains_into_the_cache_once(tmp_path):
    config = video.VideoTeacherConfig(channels=8, hidden=16, depth=1, train_steps=3, batch_size=8)
    trained = video.load_or_train_video_teacher(config, tmp_path)
    again = video.load_or_train_video_teacher(config, tmp_path)
    assert not trained.from_cache and again.from_cache and again.path == trained.path and trained.path.is_file()
    x = torch.randn(4, *SPEC.shape, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([999, 600, 200, 10]), torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(again.net(x, t, labels), trained.net(x, t, labels))
    assert video.video_teacher_path(replace(config, lr=1e-3), tmp_path) != trained.path  # the key is the config


def test_learned_backend_puts_the_adapters_on_the_teachers_own_linears(tiny_teacher):
    backend = video.VideoBackend(SPEC, learned=tiny_teacher, lora_rank=4)
    patched = {n.split(".lora_")[0] for n, _ in backend.model.named_parameters() if ".lora_" in n}
    assert {"inp", "blocks.0.fc1", "blocks.0.gmix", "blocks.1.emb", "out"} <= patched
    assert backend.model is not tiny_teacher.net  # a copy: the cached teacher stays adapter-free
    with pytest.raises(ValueError, match="trained on"):
        video.VideoBackend(video.VideoSpec(name="other", side=5), learned=tiny_teacher)


def test_learned_teachers_fifty_steps_beat_its_four_on_consistency(tiny_teacher, reference):
    clips, ref_labels = reference
    labels = video.balanced_labels(SPEC, 512)
    noise = torch.randn(512, *SPEC.shape, generator=torch.Generator().manual_seed(0))
    t50, t4 = (video.video_scores(SPEC, video.teacher_samples(SPEC, noise, labels, n, tiny_teacher), labels, clips,
                                  ref_labels) for n in (50, 4))
    print(f"tiny learned video teacher: 50 steps {t50}, 4 steps {t4}")
    assert t50["track_consistent"] > t4["track_consistent"] + 0.05
    assert t50["frame_w2"] < t4["frame_w2"]

