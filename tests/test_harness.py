"""The harness itself must be right before anything else can be proven with it: each test here can fail."""

from __future__ import annotations

import torch

from tdm_devkit import twins


def _sd15_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, twins.SD15_CONTEXT_DIM, generator=g)
    return x, context


def test_sd15_twins_give_the_same_raw_output(sd15_twin):
    x, context = _sd15_inputs()
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        ours = sd15_twin.comfy.model.diffusion_model(x, timesteps=t, context=context)
        reference = sd15_twin.diffusers(x, t, encoder_hidden_states=context).sample
    assert reference.abs().max() > 0.1  # a dead network would agree trivially
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-6)


def test_sd15_twins_give_the_same_x0_through_comfy_model_sampling(sd15_twin):
    """ComfyUI's full denoising wrapper (input scaling, ε → x0) against the diffusers ε formula."""
    x0_true, context = _sd15_inputs(2)
    model = sd15_twin.comfy.model
    sigma = torch.tensor([4.0817, 4.0817])
    noise = torch.randn_like(x0_true)
    x_noisy = x0_true + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        x0_comfy = model.apply_model(x_noisy, sigma, c_crossattn=context)
        # diffusers: VP input x_t = x/sqrt(1+σ²), timestep from σ, x0 = x - σ ε
        t = model.model_sampling.timestep(sigma)
        x_t = x_noisy / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1)
        eps = sd15_twin.diffusers(x_t, t, encoder_hidden_states=context).sample
        x0_reference = x_noisy - sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x0_comfy, x0_reference, rtol=0, atol=2e-5)


def test_sd3_twins_give_the_same_raw_output(sd3_twin, sd35_twin):
    g = torch.Generator().manual_seed(3)
    for twin in (sd3_twin, sd35_twin):
        x = torch.randn(2, 16, 16, 16, generator=g)
        context = torch.randn(2, 5, twins.SD3_JOINT_ATTENTION_DIM, generator=g)
        pooled = torch.randn(2, twins.SD3_POOLED_DIM, generator=g)
        t = torch.tensor([999.0, 666.0])
        with torch.no_grad():
            ours = twin.comfy.model.diffusion_model(x, t, y=pooled, context=context)
            reference = twin.diffusers(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                       pooled_projections=pooled).sample
        assert reference.abs().max() > 0.1
        # fused qkv vs three matmuls: never bit-exact, fp32 rounding relative to the output's scale
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * reference.abs().max().item())


def test_sd35_twin_carries_dual_attention(sd35_twin, sd3_twin):
    keys = set(sd35_twin.diffusers.state_dict())
    assert any(".attn2." in k for k in keys)
    assert not any(".attn2." in k for k in sd3_twin.diffusers.state_dict())
    assert sd35_twin.comfy.model.model_config.unet_config["x_block_self_attn_layers"] == [0]


def test_twins_are_deterministic_and_seeded():
    a = twins.sd3_diffusers_transformer(seed=5).state_dict()
    b = twins.sd3_diffusers_transformer(seed=5).state_dict()
    c = twins.sd3_diffusers_transformer(seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pos_embed.pos_embed"], c["pos_embed.pos_embed"])
    # every floating parameter and buffer is randomised: no all-zero or all-one tensor is left
    for name, tensor in a.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            assert tensor.std() > 0, name
