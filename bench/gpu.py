"""GPU benchmark at real model sizes with random weights (nothing to download); prints ONE JSON line.

    .venv/bin/python bench/gpu.py            on CUDA: SD1.5 (860 M UNet) at 512², SD3-medium (2 B MMDiT) at 1024², bf16
    .venv/bin/python bench/gpu.py --tiny     any device: the same code on tiny models at 64² (the test suite runs it on
                                             the CPU so that this script cannot rot between GPU sessions)

Sections of the line:
- `sampling.<family>`: TDM 4 steps through the TDM KSampler node (ComfyUI's sample_custom with the TDM sampler and
  sigmas, CFG 1) against the base model's own recipe through ComfyUI's sampling path (the preset's teacher steps and
  CFG, ComfyUI's euler on the simple schedule): NFE of each, wall seconds (median of `--repeats`, CUDA synchronised),
  speed-up. ComfyUI picks the compute dtype for bf16 weights on the device (bf16 on a bf16 GPU).
- `distill.<family>.batch<B>`: TDM Distill's own `build_runtime` (one teacher, adapters on ComfyUI's weights) in
  bf16 with gradient checkpointing, batch 1 and 4: iterations/s over `--iterations` steps after one warm-up step,
  and peak memory (CUDA: torch.cuda.max_memory_allocated from before the job was built; CPU: the process's peak
  resident size, which only grows across sections). Then the same trainer's iteration cost (bench/distill.py's
  `_cost` and `network_passes`, goal ≤ 1.15): `iteration_cost_ratio` = median wall time of one training iteration
  (`iteration_ms`) ÷ (`student_forwards` × `student_forward_ms` + `fake_forward_backward_ms` +
  `student_forward_backward_ms` + `teacher_forward_ms` + `fake_forward_ms`), each pass timed alone on the
  iteration's shapes with the same network (bf16, gradient checkpointing), interleaved with the iterations in
  `--cost-rounds` rounds (`iteration_cost_rounds`; medians, every timing CUDA synchronised). What the ratio adds above
  1 is the iteration's own overhead: host work, syncs, adapter switches, the loss arithmetic, optimiser steps.
  `--micro-batches 0,1` adds `distill.<family>.batch<B>.micro1`: the same job with TDM Distill's micro_batch 1 (every
  network pass one row, gradients accumulated), its it/s and peak memory beside the one-pass run's (no cost rounds).
- `multi_device`: the headless trainer (`python -m tdm_core.distill` under `torchrun`, data-parallel) on a
  random-weight SD1.5 UNet in bf16 with gradient checkpointing (`tdm_devkit.bench_teachers`), the same per-device
  batch on 1 device and on all of them: samples/s (global batch ÷ median step time after the first step), each
  device's peak memory, and the scaling efficiency samples/s(N) ÷ (N × samples/s(1)); then the same N-device run
  with `parallel = "fsdp"` (the teacher and adapters sharded with torch's fully_shard, tdm_core/distill/sharding.py):
  its it/s, each device's peak memory and share of the teacher's weights, against the data-parallel run's
  (`fsdp_vs_ddp`). With fewer than two CUDA devices it says so (`skipped`) and runs nothing; `--tiny` runs it on the
  CPU with gloo at 2 processes instead (peak memory is then each process's resident size: no sharding figure).
Text encoders are not benchmarked: prompts are random tensors of the real shapes (SD1.5: 77×768; SD3: 154×4096 and
a 2048-d pooled vector).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdm_devkit import comfy_runtime  # noqa: E402

SEED = 0
PROMPTS = ["a photo of a red fox in fresh snow", "a bowl of ramen, studio light", "a lighthouse at dusk",
           "a watercolor of a sailing boat"]

# ComfyUI's configs as its model detection finds them in real checkpoints (SD1.5; SD3-medium), and tiny twins of
# the same layouts for --tiny.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def sd3_config(depth: int, context_dim: int, pooled_dim: int, pos_embed_max_size: int) -> dict:
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": pooled_dim,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": context_dim, "out_features": 64 * depth}},
            "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}


SIZES = {
    "real": {
        "sd15": {"unet": SD15_UNET, "context": (77, 768), "pooled": None, "pixels": 512},
        "sd3": {"unet": sd3_config(24, 4096, 2048, 192), "context": (154, 4096), "pooled": 2048, "pixels": 1024},
    },
    "tiny": {
        "sd15": {"unet": dict(SD15_UNET, model_channels=32, context_dim=64), "context": (77, 64), "pooled": None,
                 "pixels": 64},
        "sd3": {"unet": sd3_config(2, 64, 32, 16), "context": (154, 64), "pooled": 32, "pixels": 64},
    },
}
PRESET = {"sd15": "dreamshaper", "sd3": "sd3"}


def log(message: str) -> None:
    print(f"[bench/gpu] {message}", file=sys.stderr, flush=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(family: str, size: dict, dtype: torch.dtype):
    """A ComfyUI MODEL of the family's layout with random weights, built on ComfyUI's device in `dtype` (the compute
    dtype is what ComfyUI's loaders would pick for those weights there)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from tdm_devkit import twins

    device = comfy.model_management.get_torch_device()
    config_class = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SD3
    model_config = config_class(dict(size["unet"]))
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device))
    with torch.inference_mode():  # as a checkpoint loader node runs
        base = model_config.get_model({}, device=device)
        twins.randomise_(base.diffusion_model, SEED)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher


class BenchCLIP:
    """The two calls TDM Distill makes on a CLIP, with random encodings of the family's real shapes."""

    def __init__(self, size: dict):
        self.size = size

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        return conditioning(self.size, tokens["text"])


def conditioning(size: dict, text: str) -> list:
    generator = torch.Generator().manual_seed(sum(map(ord, text)))
    context = torch.randn(1, *size["context"], generator=generator)
    extra = {} if size["pooled"] is None else {"pooled_output": torch.randn(1, size["pooled"], generator=generator)}
    return [[context, extra]]


class CountNFE:
    """Model evaluations per image: the images each forward call of the network is given (ComfyUI batches CFG's
    conditional and unconditional halves into one call), divided by the latent batch."""

    def __init__(self, module, images: int = 1):
        self.total, self.images = 0, images
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        self.total += x.shape[0]

    def stop(self) -> int:
        self.handle.remove()
        return self.total // self.images


def bench_sampling(family: str, model, size: dict, sampling_nodes, repeats: int) -> dict:
    import comfy.sample
    import comfy.samplers

    from tdm_core import presets

    preset = presets.get_preset(PRESET[family])
    channels = int(model.model.latent_format.latent_channels)
    side = size["pixels"] // 8
    latent = torch.zeros(1, channels, side, side)
    cond = conditioning(size, PROMPTS[0])
    uncond = [[torch.zeros_like(cond[0][0]), {k: torch.zeros_like(v) for k, v in cond[0][1].items()}]]
    noise = comfy.sample.prepare_noise(latent, SEED)
    teacher_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                                     preset.teacher.steps).cpu()

    def tdm():
        sampling_nodes.TDMKSampler.execute(model=model, positive=cond, latent_image={"samples": latent},
                                           preset=preset.name, steps=preset.steps, seed=SEED)

    def teacher():
        comfy.sample.sample_custom(model, noise, preset.teacher.cfg, comfy.samplers.sampler_object("euler"),
                                   teacher_sigmas, cond, uncond, latent, disable_pbar=True, seed=SEED)

    counts = {}
    for name, function in (("tdm", tdm), ("teacher", teacher)):
        counter = CountNFE(model.model.diffusion_model)
        function()
        counts[name] = counter.stop()
    with torch.inference_mode():
        t_tdm, t_teacher = timed(tdm, repeats), timed(teacher, repeats)
    log(f"sampling {family}: tdm {t_tdm:.3f}s ({counts['tdm']} NFE), teacher {t_teacher:.3f}s ({counts['teacher']})")
    return {"preset": preset.name, "pixels": size["pixels"], "nfe_tdm": counts["tdm"],
            "nfe_teacher": counts["teacher"], "time_tdm_s": round(t_tdm, 4), "time_teacher_s": round(t_teacher, 4),
            "speedup": round(t_teacher / t_tdm, 2), "nfe_ratio": round(counts["teacher"] / counts["tdm"], 2)}


def bench_distill(family: str, model, size: dict, distill_jobs, batch: int, iterations: int,
                  cost_rounds: int = 3, micro_batch: int = 0) -> dict:
    import resource

    settings = dict(steps=4, grid="auto", iterations=iterations + 1, lora_rank=16, lora_alpha=0.0,
                    learning_rate=1e-4, cfg=2.0, batch_size=batch, width=size["pixels"], height=size["pixels"],
                    save_every=0, keep_last=1, preview_every=0, seed=SEED, gradient_checkpointing=True,
                    dtype="bfloat16", offload="none", unconditional_prompt="", micro_batch=micro_batch)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():  # as ComfyUI executes TDM Distill
        runtime, _, _ = distill_jobs.build_runtime(model, BenchCLIP(size), settings, PROMPTS)
    with torch.inference_mode(False):
        session = runtime.build(None)
        session.step()  # warm-up (kernels, allocator)
        synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            metrics = session.step()
        synchronize()
        seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"batch": batch, "micro_batch": micro_batch, "pixels": size["pixels"], "iterations": iterations,
              "it_per_s": round(iterations / seconds, 4), "peak_mb": round(peak_mb, 1),
              "student_steps_per_iteration": float(metrics["student_steps"]),
              "finite": all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss_fake", "loss_gen"))}
    log(f"distill {family} batch {batch} micro_batch {micro_batch}: {result['it_per_s']} it/s, "
        f"peak {result['peak_mb']} MB")
    if cost_rounds > 0:
        result.update(iteration_cost(session.trainer, cost_rounds))
        log(f"distill {family} batch {batch} cost: iteration {result['iteration_ms']} ms = "
            f"{result['iteration_cost_ratio']} × passes ({result['student_forwards']} × student forward "
            f"{result['student_forward_ms']} ms, fake fwd+bwd {result['fake_forward_backward_ms']}, student fwd+bwd "
            f"{result['student_forward_backward_ms']}, teacher {result['teacher_forward_ms']}, fake forward "
            f"{result['fake_forward_ms']})")
    del runtime, session
    import gc

    gc.collect()
    return result


def iteration_cost(trainer, rounds: int) -> dict:
    """bench/distill.py's iteration cost on this trainer (already warmed up by the it/s steps, so no more warm-up
    steps): `rounds` training iterations and the network passes they make, each timed alone, in turn (see the
    docstring)."""
    sys.path.insert(0, str(REPO / "bench"))
    import distill

    cost = distill._cost(trainer, rounds, warmup=0)
    return {"iteration_cost_ratio": cost.pop("ratio"), "iteration_ms": round(cost.pop("iteration_s") * 1000, 3),
            "iteration_cost_rounds": rounds, **cost}


def bench_multi_device(tiny: bool, iterations: int, per_device_batch: int) -> dict:
    """Data-parallel scaling of the headless trainer: one run on 1 device, one on every device (see the docstring)."""
    if tiny:
        worlds, note = (1, 2), "CPU, gloo, 2 processes (tiny UNet): the code path, not a GPU figure"
    else:
        devices = torch.cuda.device_count()
        if devices < 2:
            return {"skipped": f"{devices} CUDA device{'' if devices == 1 else 's'} here: data-parallel scaling needs "
                               "2 or more (torchrun --nproc_per_node N); nothing was run"}
        worlds, note = (1, devices), f"{devices} × {torch.cuda.get_device_name()}, nccl"
    result = {"note": note, "per_device_batch": per_device_batch, "runs": {}, "fsdp": {}}
    with tempfile.TemporaryDirectory(prefix="tdm_multi_device_") as work:
        for world in worlds:
            result["runs"][str(world)] = _data_parallel_run(Path(work) / f"world{world}", world, tiny, iterations,
                                                            per_device_batch)
        # the same N-device run with the teacher and adapters sharded instead of replicated
        result["fsdp"][str(worlds[-1])] = _data_parallel_run(Path(work) / f"fsdp{worlds[-1]}", worlds[-1], tiny,
                                                             iterations, per_device_batch, parallel="fsdp")
    one, many = result["runs"][str(worlds[0])], result["runs"][str(worlds[-1])]
    result["scaling_efficiency"] = round(many["samples_per_s"] / (worlds[-1] * one["samples_per_s"]), 3)
    sharded = result["fsdp"][str(worlds[-1])]
    result["fsdp_vs_ddp"] = {
        "world_size": worlds[-1],
        "it_per_s": {"ddp": many["it_per_s"], "fsdp": sharded["it_per_s"]},
        "peak_memory_mb_per_device": {"ddp": many["peak_memory_mb_per_device"],
                                      "fsdp": sharded["peak_memory_mb_per_device"]},
        # the largest device's peak under FSDP over data parallelism's (below 1: sharding saves memory)
        "peak_memory_ratio": round(max(sharded["peak_memory_mb_per_device"])
                                   / max(many["peak_memory_mb_per_device"]), 3),
        "speed_ratio": round(sharded["it_per_s"] / many["it_per_s"], 3)}
    return result


def _data_parallel_run(folder: Path, world: int, tiny: bool, iterations: int, per_device_batch: int,
                       parallel: str = "ddp") -> dict:
    folder.mkdir(parents=True)
    config = {"prompts": PROMPTS, "iterations": iterations + 1, "batch_size": per_device_batch * world,
              "lora_rank": 16, "preview_every": 0, "checkpoint_every": 0, "log_every": 1, "seed": SEED,
              "output_dir": str(folder / "out"), "parallel": parallel,
              "teacher": {"factory": "tdm_devkit.bench_teachers:sd15_unet", "size": "tiny" if tiny else "real",
                          "dtype": "float32" if tiny else "bfloat16"}}
    (folder / "run.json").write_text(json.dumps(config))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "tdm_core.distill", "--config",
               str(folder / "run.json"), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the {world}-process {parallel} run failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    steps = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(m["seconds"] for m in steps[1:])  # the first step warms up (kernels, allocator)
    return {"world_size": summary["world_size"], "parallel": parallel, "sharded": summary["sharded"],
            "global_batch": config["batch_size"], "median_step_s": round(step_s, 4),
            "it_per_s": round(1 / step_s, 3), "samples_per_s": round(config["batch_size"] / step_s, 3),
            "peak_memory_mb_per_device": summary["peak_memory_mb"],
            "teacher_parameters_per_device": summary["local_base_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64² (runs anywhere; the suite's check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5, help="timed distillation iterations per setting")
    parser.add_argument("--families", default="sd15,sd3")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--sections", default="sampling,distill,multi_device",
                        help="which sections to run (sampling and distill run together, per family)")
    parser.add_argument("--cost-rounds", type=int, default=3,
                        help="rounds of the distill sections' iteration-cost measurement (0: not measured)")
    parser.add_argument("--multi-device-batch", type=int, default=2, help="per-device batch of the multi-device runs")
    parser.add_argument("--micro-batches", default="0",
                        help="TDM Distill's micro_batch values of the distill section (0: one pass per update); "
                             "each other value adds a `<family>.batch<B>.micro<M>` entry, without the cost rounds "
                             "(bench/distill.py's pass model is of one pass per update)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"sampling", "distill", "multi_device"}
    if unknown:
        parser.error(f"unknown section {sorted(unknown)[0]!r}; choose from sampling, distill, multi_device")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: real sizes need a GPU; use --tiny on the CPU")
    comfy_runtime.bootstrap_on_device()
    pack = comfy_runtime.load_pack()
    sampling_nodes = sys.modules[pack.__name__ + ".nodes.sampling"]
    distill_jobs = sys.modules[pack.__name__ + ".nodes.distill_jobs"]
    sizes = SIZES["tiny" if args.tiny else "real"]
    dtype = torch.float32 if args.tiny and not torch.cuda.is_available() else torch.bfloat16
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"bench": "gpu", "device": device, "sizes": "tiny" if args.tiny else "real",
              "weights_dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "comfyui": comfy_runtime.comfyui_version(), "sampling": {}, "distill": {}}
    if "multi_device" in sections:
        report["multi_device"] = bench_multi_device(args.tiny, args.iterations, args.multi_device_batch)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if sections & {"sampling", "distill"} else []
    for family in families:
        if family not in sizes:
            parser.error(f"unknown family {family!r}; choose from {', '.join(sizes)}")
        model = build_model(family, sizes[family], dtype)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        report.setdefault("params_m", {})[family] = round(params / 1e6, 1)
        report["sampling"][family] = bench_sampling(family, model, sizes[family], sampling_nodes, args.repeats)
        for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
            for micro in [int(m) for m in args.micro_batches.split(",") if m.strip()]:
                key = f"{family}.batch{batch}" + (f".micro{micro}" if micro else "")
                report["distill"][key] = bench_distill(family, model, sizes[family], distill_jobs, batch,
                                                       args.iterations, 0 if micro else args.cost_rounds, micro)
        del model
    print(json.dumps(report))


if __name__ == "__main__":
    main()
