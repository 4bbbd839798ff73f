"""Peak memory of TDM training: LoRA student + LoRA fake score on one frozen teacher vs. the official layout of three
full copies (teacher, trainable student, trainable fake score), on one model, in one run.

Model: an SD1.5-layout diffusers UNet2DConditionModel at (128, 256, 512, 512) channels (~100 M parameters, fp32),
big enough that weights, gradients and AdamW moments dominate; batch 1, 4×16×16 latent, LoRA rank 16 on attention and
feed-forward layers. Each mode runs 2 TDM iterations in a fresh subprocess. On CUDA the figure is
torch.cuda.max_memory_allocated; on CPU it is the peak resident set size (ru_maxrss) minus the resident size after
the imports, i.e. what the model and training added.

The ComfyUI job path (`comfy_job_*`): TDM Distill's own `build_runtime` and two training steps on a real-size
SD1.5 UNet in ComfyUI's layout (ComfyUI's SD15 config: 320 channels, 768-d context, ~860 M parameters, random
weights, fp32 on the CPU, batch 1, 8×8 latents, LoRA rank 16), loaded through ComfyUI's model management as a
checkpoint is. `comfy_job_ratio` = what the process added from before the teacher existed to its peak during the job
÷ the teacher's weight bytes: a job that held the teacher twice (the deep copy it used to train) measures ≥ 2, one
that trains on ComfyUI's own weights ~1. `comfy_job_ratio_copy` is the same job with the weights copied instead of
shared, measured in the same run for comparison. CPU figures (ru_maxrss); the bench needs ~12 GB of RAM.

    .venv/bin/python bench/trainer_memory.py        -> {"bench":"trainer_memory","peak_lora_mb":…,"peak_full_mb":…,"ratio":…,
                                                        "comfy_job_peak_mb":…,"teacher_mb":…,"comfy_job_ratio":…,…}
    .venv/bin/python bench/trainer_memory.py --only comfy_job      (just the ComfyUI job path)
    .venv/bin/python bench/trainer_memory.py --only wan21          (the Wan 2.1 1.3B plan, docs/video_memory.md)

The Wan 2.1 plan (`wan21_*`): the peak of one TDM iteration of Wan 2.1 1.3B at 832×480 on a 24 GB card, estimated
from counted tensors (`wan_estimate`: bf16 base weights, two rank-16 LoRAs on WAN_TARGETS with fp32 AdamW states,
checkpointed blocks' saved inputs and one block's recompute), checked against TDM Distill's own job path on the CPU at
reduced size (`measure_wan`: ComfyUI's WanModel at the real width 1536 / ffn 8960 but 2 blocks, a clip of a few
latent frames, bfloat16, gradient checkpointing on, cfg 5, batch 1): the training's addition to resident memory
(VmHWM reset after the teacher is loaded) against the estimate's adapter + optimiser + activation terms at the same
size, at two clip sizes. CPU only here; no GPU figure was measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(mode: str) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from diffusers import UNet2DConditionModel

    from tdm_core.distill import DiscreteSchedule, DistillConfig, TDMTrainer, diffusers_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    baseline = _rss_mb()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32,
    ).to(device)
    params = sum(p.numel() for p in unet.parameters())

    def encode(prompts):
        g = torch.Generator().manual_seed(0)
        return {"encoder_hidden_states": torch.randn(len(prompts), 8, 256, generator=g).to(device)}

    config = DistillConfig(prompts=["a cat"], batch_size=1, total_steps=1000, lora_rank=16, mode=mode)
    backend = diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=encode,
                                latent_shape=(4, 16, 16), mode=mode, lora_rank=16)
    trainer = TDMTrainer(backend, config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    trainable = sum(p.numel() for p in trainer.student_params) + sum(p.numel() for p in trainer.fake_params)
    return {"mode": mode, "peak_mb": peak, "params": params, "trainable": trainable, "device": str(device)}


COMFY_JOB_SETTINGS = dict(steps=4, grid="auto", iterations=2, lora_rank=16, lora_alpha=0.0, learning_rate=1e-4,
                          cfg=2.0, batch_size=1, width=64, height=64, save_every=0, keep_last=1, preview_every=0,
                          seed=0, gradient_checkpointing=False, dtype="auto", offload="none", unconditional_prompt="")


def measure_comfy_job(mode: str) -> dict:
    import resource

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import gpu  # ComfyUI's real SD1.5 layout, its model builder and CLIP stand-in: one copy for both benches

    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.model_management
    import torch

    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    backend_module = sys.modules[distill_jobs.__name__.rsplit(".", 1)[0] + ".training_network"]
    if mode == "copy":
        import tdm_core.distill.backend as core_backend  # where every shared training tree takes its aliases

        core_backend._alias = lambda tensor: tensor.detach().clone()  # the weights copied, as a deep copy did
    size = gpu.SIZES["real"]["sd15"]
    baseline = _rss_mb()
    model = gpu.build_model("sd15", size, torch.float32)  # random weights, built as a checkpoint loader node does
    base = model.model
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
    teacher_mb = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters()) / 2**20
    with torch.inference_mode():
        runtime, _, _ = distill_jobs.build_runtime(model, gpu.BenchCLIP(size), dict(COMFY_JOB_SETTINGS), ["a cat", "a dog"])
    shared = backend_module.shares_weights(runtime.backend.model, model)
    session = runtime.build(None)
    with torch.inference_mode(False):
        for _ in range(COMFY_JOB_SETTINGS["iterations"]):
            session.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"mode": mode, "peak_mb": peak, "teacher_mb": teacher_mb, "params": int(teacher_mb * 2**20 / 4),
            "shared_weights": shared, "comfyui": comfy_runtime.comfyui_version(),
            "device": str(comfy.model_management.get_torch_device())}


# ---------------------------------------------------------------------------------------------------------------
# Wan 2.1 1.3B: the estimate from counted tensors and the reduced-size measurement on the job path

WAN13B = dict(dim=1536, ffn=8960, layers=30, heads=12, text_dim=4096, channels=16, patch=(1, 2, 2), freq_dim=256)
WAN_TEXT_LEN = 512  # ComfyUI's umt5 pads every prompt to 512 tokens (zeroed), so cross-attention sees 512
GIB = 2**30


def wan_tokens(width: int, height: int, frames: int, patch=(1, 2, 2)) -> int:
    """Video tokens of one clip: ((frames − 1)/4 + 1) latent frames × (height/8/2) × (width/8/2)."""
    latent_frames = (frames - 1) // 4 + 1
    return latent_frames // patch[0] * (height // 8 // patch[1]) * (width // 8 // patch[2])


def wan_parameters(dim, ffn, layers, text_dim, channels, patch, freq_dim, **_) -> int:
    """The T2V WanModel's parameters, counted layer by layer as ComfyUI builds it (comfy/ldm/wan/model.py)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(dim, dim) + 2 * dim  # q, k, v, o and the two RMSNorms' weights
    block = 2 * attention + 2 * dim + linear(dim, ffn) + linear(ffn, dim) + 6 * dim  # + norm3 (affine), modulation
    patch_in = channels * patch[0] * patch[1] * patch[2] * dim + dim
    embeddings = linear(text_dim, dim) + linear(dim, dim) + linear(freq_dim, dim) + linear(dim, dim) + linear(dim, 6 * dim)
    head = linear(dim, channels * patch[0] * patch[1] * patch[2]) + 2 * dim
    return layers * block + patch_in + embeddings + head


def wan_lora_parameters(dim, ffn, layers, rank=16, **_) -> int:
    """One adapter's parameters on WAN_TARGETS (tdm_core/families.py): r·(in + out) per targeted linear."""
    per_block = 8 * rank * (dim + dim) + rank * (dim + ffn) + rank * (ffn + dim)
    return layers * per_block


def wan_block_bytes_per_token(dim, ffn, **_) -> dict:
    """What autograd keeps per video token while ONE block is recomputed with gradients (batch 1), counted from
    WanAttentionBlock.forward under bf16 autocast: the residual stream and the LayerNorm / modulation results are
    float32 (the modulation `e` is float32, so every addcmul promotes), the linears' inputs are cast to bf16 and their
    outputs are bf16. Tensors smaller than a token's width (LoRA's rank-16 intermediates, norms' statistics) are left
    out."""
    f32, bf16 = 4, 2
    saved = {
        "fp32 residual / norm / modulated (norm1, x1, x2, norm3, norm2, ffn input, 2 addcmul)": 8 * f32 * dim,
        "bf16 casts of linear inputs (self qkv, self o, cross q, cross o, ffn.0)": 5 * bf16 * dim,
        "self-attn q, k (linear, RMSNorm, rope), v, attention out, o": 8 * bf16 * dim,
        "cross-attn q (linear, RMSNorm), attention out, o": 4 * bf16 * dim,
        "ffn hidden (ffn.0 out, GELU-tanh out, its bf16 cast)": 3 * bf16 * ffn,
        "ffn.2 out": bf16 * dim,
    }
    return {"items": saved, "total": sum(saved.values())}


def wan_estimate(tokens: int, text_len: int = WAN_TEXT_LEN, rank: int = 16, cfg_batch: int = 2, **config) -> dict:
    """Bytes of one TDM iteration's peak (one GPU, batch 1), term by term (see docs/video_memory.md).

    weights: bf16 base; adapters: two fp32 LoRAs; optimiser: fp32 AdamW moments (2 per adapter weight); grads: one
    adapter's fp32 gradients (the trainer frees them after each update); checkpoints: each block's saved float32
    input [tokens, dim] (the student's graph is held while the teacher runs); recompute: one block's saved tensors
    during backward ×2 (their gradients exist beside them at the block's peak); teacher_transient: the no-grad
    teacher's cond+uncond pass (batch 2), at most one block's ffn hidden and its GELU in bf16, reached while the
    student's checkpoints are held."""
    cfg_ = {**WAN13B, **config}
    dim, ffn, layers = cfg_["dim"], cfg_["ffn"], cfg_["layers"]
    lora = wan_lora_parameters(rank=rank, **cfg_)
    block = wan_block_bytes_per_token(**cfg_)["total"]
    terms = {
        "weights": 2 * wan_parameters(**cfg_),
        "adapters": 4 * 2 * lora,
        "optimiser": 4 * 2 * 2 * lora,
        "grads": 4 * lora,
        "checkpoints": layers * tokens * dim * 4,
        "recompute": 2 * tokens * block,
        "context": layers * 2 * text_len * dim * 2 + text_len * cfg_["text_dim"] * 4,  # cross k, v; the umt5 input
    }
    teacher_transient = cfg_batch * tokens * 2 * ffn * 2
    terms["activations_peak"] = terms["checkpoints"] + max(terms["recompute"], teacher_transient)
    terms["total"] = sum(terms[k] for k in ("weights", "adapters", "optimiser", "grads", "context",
                                           "activations_peak"))
    return terms


WAN_MEASURE_SETTINGS = dict(unconditional_prompt="", steps=4, grid="auto", iterations=2, lora_rank=16, lora_alpha=0.0,
                            learning_rate=1e-4, batch_size=1, save_every=0, keep_last=1, preview_every=0, seed=0,
                            gradient_checkpointing=True, dtype="bfloat16", offload="none", cfg=5.0)


def _vm(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0.0


def measure_wan(layers: int, width: int, height: int, frames: int) -> dict:
    """TDM Distill's job path (build_runtime → TDMTrainer steps) on ComfyUI's WanModel at Wan 2.1 1.3B's width with
    `layers` blocks, bf16 weights (loaded as UNETLoader's weight_dtype bf16 does), gradient checkpointing, cfg 5,
    batch 1. The figure is the training's addition to resident memory: the peak (VmHWM, reset once the teacher is
    loaded and the runtime built) minus the resident size at that moment."""
    import gc

    sys.path.insert(0, str(REPO))
    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.ldm.wan.model
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    import torch

    from tdm_core.distill import TDMTrainer
    from tdm_devkit import twins_wan as tw

    torch.set_num_threads(2)
    c = WAN13B
    with torch.no_grad():
        network = comfy.ldm.wan.model.WanModel(
            model_type="t2v", patch_size=c["patch"], in_dim=c["channels"], out_dim=c["channels"], dim=c["dim"],
            ffn_dim=c["ffn"], num_layers=layers, num_heads=c["heads"], freq_dim=c["freq_dim"], text_dim=c["text_dim"],
            qk_norm=True, cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init,
            dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(0)
        for param in network.parameters():  # small random weights: activations stay finite through the blocks
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        del network
    params = sum(v.numel() for v in state.values())
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.bfloat16})
    del state
    gc.collect()
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    settings = dict(WAN_MEASURE_SETTINGS, width=width, height=height, frames=frames)
    with torch.inference_mode(False):
        runtime, _, _ = distill_jobs.build_runtime(patcher, tw.TinyWanCLIP(), settings, ["a cat", "a dog surfing"])
        trainer = TDMTrainer(runtime.backend, runtime.config)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size: the peak below is the training's
        before = _vm("VmRSS")
        for _ in range(settings["iterations"]):
            trainer.step()
        peak = _vm("VmHWM") - before
    tokens = wan_tokens(width, height, frames, c["patch"])
    return {"layers": layers, "tokens": tokens, "latent_shape": list(runtime.backend.latent_shape),
            "peak_added_bytes": peak, "params": params, "params_formula": wan_parameters(**{**c, "layers": layers}),
            "lora_params": sum(p.numel() for p in trainer.student_params),
            "lora_params_formula": wan_lora_parameters(**{**c, "layers": layers}),
            "text_len": tw.WAN_TINY_TEXT_LEN, "device": str(trainer.device), "comfyui": comfy_runtime.comfyui_version()}


def wan_report(sizes=((2, 256, 256, 9), (2, 256, 256, 21))) -> dict:
    """The reduced-size measurements against the estimate, then the estimate at 832×480×33 and ×81."""
    report = {}
    for layers, width, height, frames in sizes:
        m = _subprocess("--measure-wan", str(layers), str(width), str(height), str(frames))
        est = wan_estimate(m["tokens"], text_len=m["text_len"], layers=layers)
        # what the training adds on top of the loaded teacher (the weights were resident before the reset)
        predicted = est["total"] - est["weights"]
        key = f"wan21_reduced_{layers}blocks_{m['tokens']}tok"
        report[key] = {"measured_mb": round(m["peak_added_bytes"] / 2**20, 1),
                       "estimate_mb": round(predicted / 2**20, 1),
                       "measured_over_estimate": round(m["peak_added_bytes"] / predicted, 3),
                       "params_exact": m["params"] == m["params_formula"],
                       "lora_params_exact": m["lora_params"] == m["lora_params_formula"],
                       "latent_shape": m["latent_shape"], "device": m["device"]}
    for frames in (33, 81):
        tokens = wan_tokens(832, 480, frames)
        est = wan_estimate(tokens)
        report[f"wan21_832x480x{frames}"] = {"tokens": tokens, **{f"{k}_gib": round(v / GIB, 2) for k, v in est.items()}}
    report["wan21_params_m"] = round(wan_parameters(**WAN13B) / 1e6, 1)
    report["wan21_lora_params_m_per_adapter"] = round(wan_lora_parameters(**WAN13B) / 1e6, 2)
    return report


def _subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-comfy-job":
        print(json.dumps(measure_comfy_job(sys.argv[2])))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--measure-wan":
        print(json.dumps(measure_wan(*(int(a) for a in sys.argv[2:]))))
        return
    only = sys.argv[2] if len(sys.argv) == 3 and sys.argv[1] == "--only" else None
    report = {"bench": "trainer_memory"}
    if only in (None, "lora_layout"):
        results = {mode: _subprocess("--measure", mode) for mode in ("lora", "full")}
        lora, full = results["lora"]["peak_mb"], results["full"]["peak_mb"]
        report.update({
            "peak_lora_mb": round(lora, 1), "peak_full_mb": round(full, 1), "ratio": round(lora / full, 3),
            "params_m": round(results["lora"]["params"] / 1e6, 1),
            "trainable_lora_m": round(results["lora"]["trainable"] / 1e6, 2), "device": results["lora"]["device"],
        })
    if only in (None, "comfy_job"):
        shared, copied = _subprocess("--measure-comfy-job", "shared"), _subprocess("--measure-comfy-job", "copy")
        report.update({
            "comfy_job_peak_mb": round(shared["peak_mb"], 1), "teacher_mb": round(shared["teacher_mb"], 1),
            "comfy_job_ratio": round(shared["peak_mb"] / shared["teacher_mb"], 3),
            "comfy_job_ratio_copy": round(copied["peak_mb"] / copied["teacher_mb"], 3),
            "comfy_job_params_m": round(shared["params"] / 1e6, 1), "comfy_job_shared_weights": shared["shared_weights"],
            "comfy_job_comfyui": shared["comfyui"], "comfy_job_device": shared["device"],
        })
    if only in (None, "wan21"):
        report.update(wan_report())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
