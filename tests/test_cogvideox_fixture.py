"""The tiny diffusers CogVideoX fixture: offline, deterministic, a loadable CogVideoX-2b folder, the 2b scheduler."""

from __future__ import annotations

import json

import pytest
import torch

from tdm_devkit import cogvideox_tiny as cvx

PROMPTS = ["a panda playing a guitar in a bamboo forest", "zebra café: Ünïcode & digits 42!"]


@pytest.fixture(scope="module")
def components():
    return cvx.build_tiny_cogvideox(seed=0)


@pytest.fixture(scope="module")
def pipe(components):
    from diffusers import CogVideoXPipeline

    pipeline = CogVideoXPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    return cvx.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "tiny-cogvideox-2b", seed=0)


def _sample(pipe, prompt=PROMPTS[0], seed=0, **kwargs):
    geometry = cvx.tiny_frame_geometry()
    kwargs = {
        "num_frames": geometry.num_frames,
        "height": geometry.height,
        "width": geometry.width,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "output_type": "latent",
        **kwargs,
    }
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_folder_has_the_cogvideox_2b_layout(saved_folder):
    index = json.loads((saved_folder / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLCogVideoX"]
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "CogVideoXDDIMScheduler"]
    for sub in ("transformer", "vae"):
        assert (saved_folder / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved_folder / "text_encoder" / "model.safetensors").is_file()
    assert (saved_folder / "scheduler" / "scheduler_config.json").is_file()
    assert (saved_folder / "tokenizer" / "tokenizer.json").is_file()


def test_folder_loads_back_with_identical_components(saved_folder, components, pipe):
    from diffusers import CogVideoXPipeline

    loaded = CogVideoXPipeline.from_pretrained(saved_folder)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = _weights(components[name]), _weights(getattr(loaded, name))
        assert sorted(ours) == sorted(theirs), name
        for key, value in ours.items():
            assert theirs[key].dtype == torch.float32, (name, key)
            assert torch.equal(value, theirs[key]), (name, key)
    # The non-persistent sin-cos table is rebuilt on loading; it must come back identical.
    assert torch.equal(
        components["transformer"].patch_embed.pos_embedding, loaded.transformer.patch_embed.pos_embedding
    )
    assert _public(loaded.scheduler.config) == _public(components["scheduler"].config)
    assert loaded.tokenizer.get_vocab() == components["tokenizer"].get_vocab()
    assert loaded.tokenizer(PROMPTS).input_ids == components["tokenizer"](PROMPTS).input_ids
    assert loaded.tokenizer.model_max_length == cvx.MAX_TEXT_SEQ_LENGTH
    # The strongest check: the loaded pipeline samples exactly what the in-memory one does.
    assert torch.equal(_sample(loaded, guidance_scale=6.0), _sample(pipe, guidance_scale=6.0))


def test_tokenizer_is_t5_shaped_and_matches_its_sentencepiece_model(components):
    from transformers import T5Tokenizer

    tokenizer = components["tokenizer"]
    reference = cvx.sentencepiece_processor()
    assert isinstance(tokenizer, T5Tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == reference.get_piece_size() > 100
    assert len(tokenizer) == components["text_encoder"].config.vocab_size
    for text in (*cvx.TOKENIZER_CORPUS, *PROMPTS, "a dog dancing on a rainy beach at dawn"):
        ids = tokenizer(text).input_ids
        assert ids == reference.encode(text) + [tokenizer.eos_token_id], text
    for text in cvx.TOKENIZER_CORPUS:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id in tokenizer(PROMPTS[1]).input_ids  # unseen characters, not a crash

    # Exactly as CogVideoXPipeline._get_t5_prompt_embeds calls it.
    batch = tokenizer(
        PROMPTS,
        padding="max_length",
        max_length=cvx.MAX_TEXT_SEQ_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, cvx.MAX_TEXT_SEQ_LENGTH)
    lengths = batch.attention_mask.sum(dim=1)
    for row, length in zip(batch.input_ids, lengths.tolist(), strict=True):
        assert row[length - 1] == tokenizer.eos_token_id and (row[length:] == tokenizer.pad_token_id).all()
    long_ids = tokenizer(" ".join(cvx.TOKENIZER_CORPUS) * 3, max_length=cvx.MAX_TEXT_SEQ_LENGTH, truncation=True)
    assert len(long_ids.input_ids) == cvx.MAX_TEXT_SEQ_LENGTH


def test_two_step_pipeline_gives_finite_outputs_of_the_tiny_geometry(pipe):
    geometry = cvx.tiny_frame_geometry()
    assert (geometry.num_frames - 1) % 4 == 0 and geometry.height % 16 == 0 and geometry.width % 16 == 0
    assert geometry.latent_shape() == (1, 3, 16, 4, 6)

    latents = _sample(pipe, guidance_scale=6.0)  # with classifier-free guidance: batch of 2 through the model
    assert latents.shape == geometry.latent_shape()
    assert torch.isfinite(latents).all() and latents.std() > 0.1
    # The tiny transformer's sample size is the tiny geometry, so the pipeline's defaults give it too.
    defaults = pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=6.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert torch.equal(defaults, latents)
    # Text reaches the video: another prompt, another result; same prompt and seed, the same result.
    assert not torch.allclose(_sample(pipe, prompt=PROMPTS[1], guidance_scale=6.0), latents, atol=1e-3)
    assert torch.equal(_sample(pipe, guidance_scale=6.0), latents)

    video = _sample(pipe, output_type="pt")  # through the VAE decoder
    assert video.shape == geometry.video_shape()
    assert torch.isfinite(video).all()
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0.05


def test_weights_are_deterministic_per_seed_and_differ_across_seeds(components):
    again = cvx.build_tiny_cogvideox(seed=0)
    other = cvx.build_tiny_cogvideox(seed=1)
    assert again["tokenizer"].get_vocab() == components["tokenizer"].get_vocab()
    for name in ("transformer", "vae", "text_encoder"):
        ours, same, different = (_weights(c[name]) for c in (components, again, other))
        assert len(ours) > 10
        for key, value in ours.items():
            assert torch.equal(value, same[key]), (name, key)
            assert not torch.equal(value, different[key]), (name, key)
    # Seeds per component differ too: no two components share a random stream.
    first = {name: next(iter(_weights(components[name]).values())).flatten()[:4] for name in ("transformer", "vae")}
    assert not torch.allclose(first["transformer"], first["vae"])


def test_every_parameter_and_saved_buffer_is_randomised(components):
    """No default zeros/ones survive (they would hide a wrong key mapping); the derived sin-cos table is kept."""
    for name in ("transformer", "vae", "text_encoder"):
        for key, value in _weights(components[name]).items():
            if value.is_floating_point() and value.numel() > 1:
                assert value.std() > 1e-3, (name, key)
                assert not torch.all(value == 1) and not torch.all(value == 0), (name, key)
    transformer = components["transformer"]
    fresh = type(transformer)(**cvx.TINY_TRANSFORMER_CONFIG)
    assert "patch_embed.pos_embedding" not in transformer.state_dict()
    assert torch.equal(transformer.patch_embed.pos_embedding, fresh.patch_embed.pos_embedding)
    assert transformer.config.use_rotary_positional_embeddings is False
    assert transformer.config.text_embed_dim == components["text_encoder"].config.d_model


def _cogvideox_alphas_cumprod():
    """tdm_method.md §3 from first principles: scaled-linear betas, ᾱ ← ᾱ/(3 − 2ᾱ), zero-terminal-SNR rescale."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    abar = abar / (3 - 2 * abar)
    root = abar.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root**2


def test_scheduler_is_the_cogvideox_2b_one(components):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = components["scheduler"]
    assert isinstance(scheduler, CogVideoXDDIMScheduler)
    config = scheduler.config
    assert config.prediction_type == "v_prediction"
    assert config.snr_shift_scale == 3.0
    assert config.rescale_betas_zero_snr is True
    assert config.timestep_spacing == "trailing"
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000 and config.set_alpha_to_one is True and config.steps_offset == 0

    abar = scheduler.alphas_cumprod
    assert abar[999] == 0  # zero terminal SNR: x0 = −v at t = 999
    assert abar[[856, 665, 399]].tolist() == pytest.approx([0.002372, 0.026151, 0.178615], abs=1e-6)
    torch.testing.assert_close(abar.double(), _cogvideox_alphas_cumprod(), rtol=1e-6, atol=1e-9)

    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
