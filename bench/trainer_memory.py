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
    .venv/bin/python bench/trainer_memory.py --only micro_batch    (an update in passes, `micro_batch`)
    .venv/bin/python bench/trainer_memory.py --only wan21          (the Wan 2.1 1.3B plan, docs/video_memory.md)
    .venv/bin/python bench/trainer_memory.py --only cogvideox      (the CogVideoX-2B plan, docs/video_memory.md)

`micro_batch_*` (`--only micro_batch`): the same UNet and rank-16 LoRAs at a 4×32×32 latent, batch 4 with every
trajectory step trained (`stages` all: 16 rows an update, 32 in the guided teacher pass), one iteration in a fresh
process with every update in one pass (`micro_batch_0_*`) and in passes of 4 and 1 rows: the peak (as above: CUDA's
max allocated, or the CPU's peak RSS over the process's start), the iteration's seconds, and both as a ratio of the
one-pass run's. Measured on the 2-core CPU machine: peak 5770 MB → 2430 MB (passes of 4, 0.42×) → 1289 MB (passes of
1, 0.22×); the iteration took 51 s, 25 s and 28 s (large batches are slower per row on this CPU; on a GPU, whose
small passes are bound by kernel launches, more passes cost time; not measured on one yet).

The Wan 2.1 plan (`wan21_*`): the peak of one TDM iteration of Wan 2.1 1.3B at 832×480 on a 24 GB card, estimated
from counted tensors (`wan_estimate`: bf16 base weights, two rank-16 LoRAs on WAN_TARGETS with fp32 AdamW states,
checkpointed blocks' saved inputs and one block's recompute), checked against TDM Distill's own job path on the CPU at
reduced size (`measure_wan`: ComfyUI's WanModel at the real width 1536 / ffn 8960 but 2 blocks, a clip of a few
latent frames, bfloat16, gradient checkpointing on, cfg 5, batch 1): the training's addition to resident memory
(VmHWM reset after the teacher is loaded) against the estimate's adapter + optimiser + activation terms at the same
size, at two clip sizes. CPU only here; no GPU figure was measured.

The CogVideoX-2B plan (`cogvideox_*`): the same for TDM Distill's `cogvideox` input (TDM CogVideoX Loader's diffusers
pipeline) at 720×480 (`cogvideox_estimate`: bf16 base, two rank-16 LoRAs on COGVIDEOX_TARGETS, the joint 226 text +
video token sequence, each block's bf16 hidden_states and encoder_hidden_states checkpointed, one block's recompute
counted from CogVideoXBlock under CUDA's bf16 autocast; the T5-XXL and VAE beside it by the loader's offload), checked
on the pipeline job path (`measure_cogvideox`: new_job_settings + _pipe_job_runtime, as start_job runs them, on a
CogVideoX transformer at the 2B's width 1920 with 2 blocks, then TDMTrainer steps) against the estimate under CPU
autocast (layer_norm in bf16 there), with glibc's mmap threshold fixed (CPU_MALLOC). CPU only; no GPU was used.
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


def _bench_unet(device):
    """The SD1.5-layout diffusers UNet of `measure` (~100 M parameters), random weights, and its prompt encoder."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32,
    ).to(device)

    def encode(prompts):
        g = torch.Generator().manual_seed(0)
        return {"encoder_hidden_states": torch.randn(len(prompts), 8, 256, generator=g).to(device)}

    return unet, encode


def _peak_mb(cuda: bool, baseline: float) -> float:
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline


def _bench_trainer(latent: int, mode: str = "lora", **settings):
    """(trainer, the UNet's own parameter count, cuda?, the process's resident MB before the model): a TDMTrainer over
    `_bench_unet` at a 4×latent×latent latent, rank-16 LoRAs (`mode` "lora") or full copies, with DistillConfig
    `settings`."""
    import torch

    sys.path.insert(0, str(REPO))
    from tdm_core.distill import DiscreteSchedule, DistillConfig, TDMTrainer, diffusers_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    baseline = _rss_mb()
    unet, encode = _bench_unet(device)
    params = sum(p.numel() for p in unet.parameters())  # before the adapters join it
    config = DistillConfig(total_steps=1000, lora_rank=16, mode=mode, **settings)
    backend = diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=encode,
                                latent_shape=(4, latent, latent), mode=mode, lora_rank=16)
    trainer = TDMTrainer(backend, config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return trainer, params, cuda, baseline


def measure(mode: str) -> dict:
    trainer, params, cuda, baseline = _bench_trainer(16, mode, prompts=["a cat"], batch_size=1)
    for _ in range(2):
        trainer.step()
    peak = _peak_mb(cuda, baseline)
    trainable = sum(p.numel() for p in trainer.student_params) + sum(p.numel() for p in trainer.fake_params)
    return {"mode": mode, "peak_mb": peak, "params": params, "trainable": trainable, "device": str(trainer.device)}


# `micro_batch` (`--only micro_batch`): the same UNet and LoRAs at a 4×32×32 latent, batch 4 with every trajectory step
# trained (`stages` "all", Flow-Factory's): 16 rows per update, the guided teacher pass 32; one iteration each with
# every update in one pass (0) and in passes of 4 and of 1 rows.
MICRO_BATCHES = (0, 4, 1)


def measure_micro_batch(micro_batch: int) -> dict:
    import time

    trainer, _, cuda, baseline = _bench_trainer(32, prompts=["a cat", "a dog"], batch_size=4, stages="all", cfg=2.0,
                                                micro_batch=micro_batch)
    start = time.perf_counter()
    trainer.step()
    seconds = time.perf_counter() - start
    return {"micro_batch": micro_batch, "peak_mb": _peak_mb(cuda, baseline), "seconds": seconds,
            "device": str(trainer.device)}


def micro_batch_report() -> dict:
    """Peak memory and time of one all-stages iteration in passes of `micro_batch` rows, each in its own process."""
    results = {m: _subprocess("--measure-micro-batch", str(m)) for m in MICRO_BATCHES}
    whole = results[0]
    report = {"micro_batch_device": whole["device"]}
    for m, result in results.items():
        report[f"micro_batch_{m}_peak_mb"] = round(result["peak_mb"], 1)
        report[f"micro_batch_{m}_seconds"] = round(result["seconds"], 2)
        if m:
            report[f"micro_batch_{m}_peak_ratio"] = round(result["peak_mb"] / whole["peak_mb"], 3)
            report[f"micro_batch_{m}_time_ratio"] = round(result["seconds"] / whole["seconds"], 3)
    return report


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


# ---------------------------------------------------------------------------------------------------------------
# CogVideoX-2B (diffusers CogVideoXTransformer3DModel, the TDM CogVideoX Loader's pipeline as TDM Distill's teacher):
# the estimate from counted tensors and the reduced-size measurement on the pipeline job path

COGVIDEOX2B = dict(dim=1920, heads=30, ffn=7680, layers=30, text_dim=4096, time_dim=512, channels=16, patch=2,
                   sample_tokens=13 * 30 * 45)  # THUDM/CogVideoX-2b transformer/config.json (ffn: diffusers' 4 × dim)
COGVIDEOX_TEXT_LEN = 226  # the pipeline pads every prompt to 226 T5 tokens; they join the video tokens in each block
T5_XXL = dict(vocab=32128, d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, buckets=32)  # google/t5-v1_1-xxl
COGVIDEOX_TARGET_COUNT = 6  # COGVIDEOX_TARGETS (tdm_core/distill/backend.py): to_q, to_k, to_v, to_out.0, ff 0/2


def cogvideox_tokens(width: int, height: int, frames: int, patch: int = 2) -> int:
    """Video tokens of one clip: ((frames − 1)/4 + 1) latent frames × (height/8/2) × (width/8/2)."""
    return ((frames - 1) // 4 + 1) * (height // 8 // patch) * (width // 8 // patch)


def cogvideox_parameters(dim, heads, ffn, layers, text_dim, time_dim, channels, patch, **_) -> int:
    """CogVideoXTransformer3DModel's parameters (the 2B layout: no rotary, no temporal patch), counted layer by layer
    as diffusers builds it (diffusers/models/transformers/cogvideox_transformer_3d.py)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    norm_zero = linear(time_dim, 6 * dim) + 2 * dim  # CogVideoXLayerNormZero: modulation linear + affine LayerNorm
    attention = 4 * linear(dim, dim) + 2 * 2 * (dim // heads)  # q, k, v, out (biased) + the q/k LayerNorms
    block = 2 * norm_zero + attention + linear(dim, ffn) + linear(ffn, dim)
    patch_embed = channels * patch * patch * dim + dim + linear(text_dim, dim)  # conv proj + text_proj
    time = linear(dim, time_dim) + linear(time_dim, time_dim)
    head = 2 * dim + linear(time_dim, 2 * dim) + 2 * dim + linear(dim, patch * patch * channels)  # norm_final, norm_out
    return layers * block + patch_embed + time + head


def cogvideox_lora_parameters(dim, ffn, layers, rank=16, **_) -> int:
    """One adapter's parameters on COGVIDEOX_TARGETS: r·(in + out) per targeted linear."""
    return layers * (4 * rank * (dim + dim) + rank * (dim + ffn) + rank * (ffn + dim))


def t5_encoder_parameters(vocab, d_model, d_ff, layers, heads, d_kv, buckets) -> int:
    """T5EncoderModel (v1.1: gated-GELU, untied, no biases): embedding, per layer q/k/v/o + wi_0/wi_1/wo + 2 RMSNorm
    weights, the first layer's relative-position table, the final norm."""
    inner = heads * d_kv
    return vocab * d_model + layers * (4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model) + buckets * heads + d_model


def cogvideox_block_bytes_per_token(dim, heads, ffn, rank=16, norm_bytes=4, **_) -> dict:
    """What autograd keeps per token of the joint sequence (226 text + video tokens) while ONE CogVideoXBlock is
    recomputed with gradients (batch 1, a LoRA active on COGVIDEOX_TARGETS), counted from CogVideoXBlock.forward and
    CogVideoXAttnProcessor2_0 under bf16 autocast. The residual stream is bf16 (patch_embed's outputs are), but CUDA
    autocast runs layer_norm in float32 (`norm_bytes` 4): the four LayerNorms (norm1, norm2, attention's norm_q and
    norm_k) save a float32 copy of their inputs; CPU autocast runs it in bf16 (`norm_bytes` 2). peft casts each LoRA
    input to the float32 adapter and autocast casts it back for lora_A, so q, k and v each keep their own bf16 copy of
    the normed sequence. The frozen base linears keep no input (their weights need no gradient). Checked exactly
    against the tensors autograd saves by `cogvideox_block_census` (CPU, layer_norm in float32 for the CUDA figure)."""
    bf16 = 2
    saved = {
        "norm1/norm2 LayerNorm inputs (the residual stream, upcast on CUDA)": 2 * norm_bytes * dim,
        "norm_q/norm_k LayerNorm inputs (q and k linears' outputs)": 2 * norm_bytes * dim,
        "bf16 lora_A inputs (to_q, to_k, to_v, to_out.0, ff.net.0.proj)": 5 * bf16 * dim,
        "flash attention q, k, v, output (bf16)": 4 * bf16 * dim,
        "flash attention logsumexp (fp32, per head)": 4 * heads,
        "ffn hidden (ff.net.0.proj out = GELU input, GELU out = ff.net.2's input)": 2 * bf16 * ffn,
        "LoRA rank-r intermediates (6 targets)": 6 * bf16 * rank,
        "LayerNorm statistics (mean, rstd)": 2 * 2 * norm_bytes + 2 * 2 * norm_bytes * heads,
    }
    return {"items": saved, "total": sum(saved.values())}

def cogvideox_block_census(norm_fp32: bool, rank: int = 16, sizes=(96, 480)) -> float:
    """Bytes per joint-sequence token that autograd saves in ONE full-width CogVideoXBlock (bf16 base, both adapters
    injected on COGVIDEOX_TARGETS, the student active, inputs requiring grad, bf16 autocast on the CPU): every tensor
    reachable as a grad_fn's `_saved_*`, deduplicated by storage, weights excluded, at two sequence lengths, the
    difference per token. `norm_fp32` runs nn.LayerNorm in float32 as CUDA's autocast does (CPU autocast keeps bf16):
    the check of `cogvideox_block_bytes_per_token`'s list."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from peft import LoraConfig, inject_adapter_in_model

    sys.path.insert(0, str(REPO))
    from tdm_core.distill.backend import COGVIDEOX_TARGETS

    c = COGVIDEOX2B
    torch.manual_seed(0)
    block = CogVideoXBlock(dim=c["dim"], num_attention_heads=c["heads"], attention_head_dim=c["dim"] // c["heads"],
                           time_embed_dim=c["time_dim"], attention_bias=True).to(torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=COGVIDEOX_TARGETS, lora_dropout=0.0)
    for name in ("student", "fake"):
        inject_adapter_in_model(copy.deepcopy(config), block, adapter_name=name)
    for name, param in block.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
        param.requires_grad_(".lora_" in name)
    for module in block.modules():
        if "_active_adapter" in module.__dict__ or hasattr(type(module), "_active_adapter"):
            module.__dict__["_active_adapter"] = ["student"]
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def fp32_layer_norm(self, x):
        with torch.autocast("cpu", enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, None if self.weight is None else self.weight.float(),
                                None if self.bias is None else self.bias.float(), self.eps)

    def saved_bytes(video: int) -> int:
        h = torch.randn(1, video, c["dim"]).bfloat16().requires_grad_(True)
        e = torch.randn(1, COGVIDEOX_TEXT_LEN, c["dim"]).bfloat16().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = block(h, e, torch.randn(1, c["time_dim"]).bfloat16())
        seen, total, stack, visited = set(weights), 0, [o.grad_fn for o in outputs], set()
        while stack:
            node = stack.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            for attr in (a for a in dir(node) if a.startswith("_saved_")):
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                        seen.add(t.untyped_storage().data_ptr())
                        total += t.untyped_storage().nbytes()
            stack.extend(n for n, _ in node.next_functions)
        return total

    original = torch.nn.LayerNorm.forward
    if norm_fp32:
        torch.nn.LayerNorm.forward = fp32_layer_norm
    try:
        with torch.inference_mode(False):
            small, large = (saved_bytes(n) for n in sizes)
    finally:
        torch.nn.LayerNorm.forward = original
    return (large - small) / (sizes[1] - sizes[0])


def cogvideox_estimate(tokens: int, text_len: int = COGVIDEOX_TEXT_LEN, rank: int = 16, cfg_batch: int = 2,
                       prompts: int = 2, norm_bytes: int = 4, **config) -> dict:
    """Bytes of one TDM iteration's peak on one GPU (batch 1), term by term, as `wan_estimate` (docs/video_memory.md).

    The joint sequence is S = text_len + tokens. weights: bf16 base; position_table: the 2B's sin-cos table for its
    sample size (49 frames at 720×480) as a bf16 buffer; adapters, optimiser, grads: as for Wan; text: the encoded
    prompts and the empty one [226, 4096] bf16 (the job encodes once and keeps them); checkpoints: each block's saved
    inputs, hidden_states and encoder_hidden_states in bf16 (S × dim × 2 B); head: norm_final's and norm_out's saved
    LayerNorm inputs over the video tokens; recompute: one block's saved tensors ×2 (their gradients beside them at the
    block's peak); teacher_transient: the no-grad cond+uncond pass (batch 2), one block's ffn hidden and its GELU.
    Not in the total: the T5 and the VAE (see `cogvideox_report`)."""
    c = {**COGVIDEOX2B, **config}
    dim, ffn, layers = c["dim"], c["ffn"], c["layers"]
    seq = text_len + tokens
    lora = cogvideox_lora_parameters(rank=rank, **c)
    block = cogvideox_block_bytes_per_token(rank=rank, norm_bytes=norm_bytes, **c)["total"]
    terms = {
        "weights": 2 * cogvideox_parameters(**c),
        "position_table": 2 * (text_len + c["sample_tokens"]) * dim,
        "adapters": 4 * 2 * lora,
        "optimiser": 4 * 2 * 2 * lora,
        "grads": 4 * lora,
        "text": (prompts + 1) * text_len * c["text_dim"] * 2,
        "checkpoints": layers * seq * dim * 2,
        "head": 2 * norm_bytes * tokens * dim,
        "recompute": 2 * seq * block,
    }
    teacher_transient = cfg_batch * seq * 2 * ffn * 2
    terms["activations_peak"] = terms["checkpoints"] + terms["head"] + max(terms["recompute"], teacher_transient)
    terms["total"] = sum(terms[k] for k in ("weights", "position_table", "adapters", "optimiser", "grads", "text",
                                           "activations_peak"))
    return terms


def cogvideox_component_bytes() -> dict:
    """bf16 bytes of the pipeline's other components: the T5-XXL (formula, checked against transformers' model built
    on the meta device) and the VAE (diffusers' AutoencoderKLCogVideoX at the 2B's config, on the meta device)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    t = T5_XXL
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(vocab_size=t["vocab"], d_model=t["d_model"], d_ff=t["d_ff"], d_kv=t["d_kv"],
                                     num_layers=t["layers"], num_heads=t["heads"], feed_forward_proj="gated-gelu",
                                     tie_word_embeddings=False))
        vae = AutoencoderKLCogVideoX()  # its defaults are CogVideoX-2b's vae/config.json
        c = COGVIDEOX2B
        transformer = CogVideoXTransformer3DModel(num_attention_heads=c["heads"], attention_head_dim=c["dim"] // c["heads"],
                                                  num_layers=c["layers"], text_embed_dim=c["text_dim"],
                                                  time_embed_dim=c["time_dim"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"t5_params": count(t5), "t5_params_formula": t5_encoder_parameters(**t), "vae_params": count(vae),
            "transformer_params": count(transformer), "transformer_params_formula": cogvideox_parameters(**c)}


COGVIDEOX_MEASURE_VALUES = dict(steps=4, grid="auto", iterations=2, lora_rank=16, lora_alpha=-1.0, learning_rate=-1.0,
                                cfg=-1.0, batch_size=1, save_every=0, keep_last=1, preview_every=0, seed=0,
                                gradient_checkpointing=True, dtype="bfloat16", offload="none", unconditional_prompt="",
                                prompts_file="(none)", output_name="memory", if_exists="refuse")
COGVIDEOX_MEASURE_PROMPTS = ["a red fox running", "waves on a beach"]


def measure_cogvideox(layers: int, width: int, height: int, frames: int) -> dict:
    """TDM Distill's pipeline job path (distill_jobs.new_job_settings + _pipe_job_runtime, which start_job runs for
    its `cogvideox` input: cogvideox_teacher.check_teacher, training_grid, build_backend on the pipeline's weights,
    the preview VAE copy) then TDMTrainer steps, on a CogVideoXPipeline as TDM CogVideoX Loader makes it (bf16, offload
    none): a transformer at CogVideoX-2B's width (30 heads × 64, ffn 7680, time 512, text 4096) with `layers` blocks
    and random seeded weights, the tiny devkit VAE, tokenizer and scheduler, a 2-layer T5 at the XXL's 4096 width.
    TDM Distill: bfloat16, gradient checkpointing, batch 1, rank 16, the recipe's cfg. The figure is the training's
    addition to resident memory: the peak (VmHWM, reset once the runtime and trainer exist) minus the resident size
    then."""
    import gc

    sys.path.insert(0, str(REPO))
    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import torch
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from tdm_core.distill import TDMTrainer
    from tdm_devkit import cogvideox_tiny as ct

    torch.set_num_threads(2)
    c = COGVIDEOX2B
    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    tokenizer = ct.build_tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **dict(ct.TINY_T5_CONFIG, d_model=c["text_dim"])))
    config = dict(ct.TINY_TRANSFORMER_CONFIG, num_attention_heads=c["heads"], attention_head_dim=c["dim"] // c["heads"],
                  num_layers=layers, text_embed_dim=c["text_dim"], time_embed_dim=c["time_dim"], sample_frames=frames,
                  sample_height=height // 8, sample_width=width // 8)
    transformer = CogVideoXTransformer3DModel(**config)
    for seed, module in enumerate((text_encoder, transformer)):
        ct.randomise_persistent_(module, 1000 + seed)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=ct.build_tiny_vae(0),
                             transformer=transformer.eval(), scheduler=ct.build_tiny_scheduler())
    pipe.to(dtype=torch.bfloat16)  # TDM CogVideoX Loader's default dtype bf16, offload none (on the CPU here)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    values = dict(COGVIDEOX_MEASURE_VALUES, width=width, height=height, frames=frames,
                  prompts="\n".join(COGVIDEOX_MEASURE_PROMPTS))
    with torch.inference_mode():  # as the node runs start_job
        job = distill_jobs.new_job_settings(None, values, COGVIDEOX_MEASURE_PROMPTS, pipe)
        runtime, _, _ = distill_jobs._pipe_job_runtime(pipe, job)
    with torch.inference_mode(False):
        trainer = TDMTrainer(runtime.backend, runtime.config)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size: the peak below is the training's
        before = _vm("VmRSS")
        for _ in range(values["iterations"]):
            trainer.step()
        peak = _vm("VmHWM") - before
    shared = {p.data_ptr() for p in pipe.transformer.parameters()}
    return {"layers": layers, "tokens": cogvideox_tokens(width, height, frames), "frames": frames,
            "latent_shape": list(runtime.backend.latent_shape), "peak_added_bytes": peak, "params": params,
            "params_formula": cogvideox_parameters(**{**c, "layers": layers}),
            "lora_params": sum(p.numel() for p in trainer.student_params),
            "lora_params_formula": cogvideox_lora_parameters(**{**c, "layers": layers}),
            "shares_pipeline_weights": all(p.data_ptr() in shared for n, p in runtime.backend.model.named_parameters()
                                           if ".lora_" not in n),
            "cfg": runtime.config.cfg, "device": str(trainer.device), "prompts": len(COGVIDEOX_MEASURE_PROMPTS)}


# glibc's malloc otherwise raises its mmap threshold to each freed block's size (up to 32 MB) and keeps freed blocks
# in its heap: the resident peak then measures its fragmentation (~2.2× the estimate here), not what training holds.
# A fixed 128 KiB threshold returns every larger tensor's pages on free, as a device allocator's live bytes would.
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def cogvideox_report(sizes=((2, 256, 256, 9), (2, 256, 256, 21))) -> dict:
    """The reduced-size measurements against the estimate (CPU autocast: layer_norm in bf16, `norm_bytes` 2), then the
    GPU estimate at 720×480×49 and ×25, with the T5-XXL on the GPU (loader offload none) and off it (offload model)."""
    report = {}
    for layers, width, height, frames in sizes:
        m = _subprocess("--measure-cogvideox", str(layers), str(width), str(height), str(frames), env=CPU_MALLOC)
        est = cogvideox_estimate(m["tokens"], layers=layers, norm_bytes=2, prompts=m["prompts"],
                                 sample_tokens=m["tokens"])
        # resident before the reset: weights, position table, adapters, encoded prompts (and the preview VAE copy)
        predicted = est["optimiser"] + est["grads"] + est["activations_peak"]
        report[f"cogvideox_reduced_{layers}blocks_{m['tokens']}tok"] = {
            "measured_mb": round(m["peak_added_bytes"] / 2**20, 1), "estimate_mb": round(predicted / 2**20, 1),
            "measured_over_estimate": round(m["peak_added_bytes"] / predicted, 3),
            "params_exact": m["params"] == m["params_formula"],
            "lora_params_exact": m["lora_params"] == m["lora_params_formula"],
            "shares_pipeline_weights": m["shares_pipeline_weights"], "latent_shape": m["latent_shape"],
            "cfg": m["cfg"], "device": m["device"]}
    parts = cogvideox_component_bytes()
    t5, vae = 2 * parts["t5_params"], 2 * parts["vae_params"]
    for frames in (49, 25):
        tokens = cogvideox_tokens(720, 480, frames)
        est = cogvideox_estimate(tokens)
        row = {"tokens": tokens, **{f"{k}_gib": round(v / GIB, 2) for k, v in est.items()}}
        # loader offload model: the T5 and the pipeline's VAE back on the CPU; the job's preview VAE copy on the GPU
        row["total_loader_offload_model_gib"] = round((est["total"] + vae) / GIB, 2)
        # loader offload none: the whole pipeline stays on the GPU (T5, VAE) beside the preview copy
        row["total_loader_offload_none_gib"] = round((est["total"] + t5 + 2 * vae) / GIB, 2)
        report[f"cogvideox_720x480x{frames}"] = row
    report.update({
        "cogvideox_params_m": round(parts["transformer_params"] / 1e6, 1),
        "cogvideox_params_exact": parts["transformer_params"] == parts["transformer_params_formula"],
        "cogvideox_lora_params_m_per_adapter": round(cogvideox_lora_parameters(**COGVIDEOX2B) / 1e6, 2),
        "cogvideox_block_bytes_per_token_cuda": cogvideox_block_bytes_per_token(**COGVIDEOX2B)["total"],
        "cogvideox_block_bytes_per_token_cpu": cogvideox_block_bytes_per_token(**COGVIDEOX2B, norm_bytes=2)["total"],
        "cogvideox_block_census_cuda": cogvideox_block_census(norm_fp32=True),
        "cogvideox_block_census_cpu": cogvideox_block_census(norm_fp32=False),
        "t5_xxl_params_m": round(parts["t5_params"] / 1e6, 1), "t5_xxl_bf16_gib": round(t5 / GIB, 2),
        "t5_params_exact": parts["t5_params"] == parts["t5_params_formula"],
        "vae_params_m": round(parts["vae_params"] / 1e6, 1), "vae_bf16_gib": round(vae / GIB, 2)})
    return report


def _subprocess(*args, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-micro-batch":
        print(json.dumps(measure_micro_batch(int(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-comfy-job":
        print(json.dumps(measure_comfy_job(sys.argv[2])))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--measure-wan":
        print(json.dumps(measure_wan(*(int(a) for a in sys.argv[2:]))))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--measure-cogvideox":
        print(json.dumps(measure_cogvideox(*(int(a) for a in sys.argv[2:]))))
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
    if only in (None, "micro_batch"):
        report.update(micro_batch_report())
    if only in (None, "wan21"):
        report.update(wan_report())
    if only in (None, "cogvideox"):
        report.update(cogvideox_report())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
