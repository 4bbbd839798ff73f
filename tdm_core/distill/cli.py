"""Headless TDM distillation: `python -m tdm_core.distill --config run.toml [--resume] [--set key=value ...]`.

Runs under `torchrun --nproc_per_node N` as data-parallel training (gloo on CPU, nccl on GPU; the global
`batch_size` is split across processes), or with `parallel = "fsdp"` as FSDP, the teacher and the adapters sharded
across the processes (sharding.py; every process then takes part in previews, checkpoints and the LoRA export, which
gather). Process 0 writes, under `output_dir`:
  metrics.jsonl                    one JSON object per logged step (losses, grad norm, LR, seconds)
  previews/step_XXXXXXXX.pt        the student's K-step samples of the preview prompts (fixed seed); a .png too if the
                                   backend has `preview_image(x0) -> uint8 [H, W, 3]` and Pillow is installed
  checkpoint-XXXXXXXX/             resumable states (see checkpoint.py), the newest `keep_last` kept
  student_lora.safetensors         the newest student LoRA
`--resume` continues from the newest checkpoint of `output_dir`, or from a given run folder or checkpoint folder, a
ComfyUI job's (`models/loras/.tdm_jobs/<id>/checkpoints/step-XXXXXXXX`) included: both write the one checkpoint
format of checkpoint.py.
The teacher is built by `config.teacher["factory"]` ("package.module:function"), called as factory(config, **rest).
Config errors exit with status 2 before any model is built; training that turns non-finite (see
`trainer.NonFiniteTrainingError`, `checkpoint.NonFiniteWeightsError`) exits with status 3, leaving the last good
checkpoint and LoRA in place.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoint import LORA_FILE, NonFiniteWeightsError, atomic_write_bytes, find_checkpoint
from .config import ConfigError, DistillConfig
from .trainer import NonFiniteTrainingError


def _peak_memory_mb() -> float:
    """This process's peak: allocated memory on its CUDA device, else its peak resident size (Linux: ru_maxrss KiB)."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_backend(config: DistillConfig):
    spec = dict(config.teacher)
    factory_name = spec.pop("factory", None)
    if not factory_name or ":" not in factory_name:
        raise ConfigError('teacher.factory must name a backend factory as "package.module:function", '
                          f"got {factory_name!r}")
    module_name, _, function_name = factory_name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"teacher.factory {factory_name!r} cannot be imported: {error}") from error
    return factory(config, **spec)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tdm_core.distill", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a .toml or .json DistillConfig")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from the newest checkpoint in output_dir (or from the given run or "
                             "checkpoint folder, a ComfyUI job's included)")
    parser.add_argument("--iterations", type=int, default=None, help="override config.iterations")
    parser.add_argument("--output-dir", default=None, help="override config.output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field (JSON values), e.g. --set cfg=4.5")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def load_config(args) -> DistillConfig:
    config = DistillConfig.load(args.config)
    data = config.to_dict()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        data[key] = _parse_value(value)
    if args.iterations is not None:
        data["iterations"] = args.iterations
    if args.output_dir is not None:
        data["output_dir"] = args.output_dir
    return DistillConfig.from_dict(data).validate()


def _init_distributed() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _write_preview(trainer, out_dir: Path, prompts: list[str]) -> None:
    """Process 0 writes the preview; under FSDP every process samples it with process 0 (each forward gathers)."""
    if trainer.rank != 0 and not trainer.sharded:
        return
    x0 = trainer.sample(prompts, seed=trainer.config.seed).cpu()
    if trainer.rank != 0:
        return
    folder = out_dir / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"prompts": prompts, "x0": x0, "step": trainer.step_count}, folder / f"step_{trainer.step_count:08d}.pt")
    to_image = getattr(trainer.backend, "preview_image", None)
    if to_image is not None:
        try:
            from PIL import Image

            Image.fromarray(to_image(x0)).save(folder / f"step_{trainer.step_count:08d}.png")
        except ImportError:
            pass


def exit_process(code: int) -> None:
    """Leave the process with ``code``; a torchrun worker leaves without the interpreter's teardown.

    A worker's run is over when ``main`` returns: its files are written and closed, its process group destroyed.
    What is left is the interpreter's own teardown, in which torch's C++ side (gloo's transport threads) has
    aborted a finished two-process run, rarely and only under load ("terminate called without an active
    exception", signal 6 in both workers), turning a complete run into a failed one for torchrun. A worker
    therefore flushes its output and exits at once.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    distributed = _init_distributed()
    if not distributed:
        return _train(args, config, distributed=False)
    # a C++ abort in one worker ends all of them; this prints each worker's Python stack when it happens
    faulthandler.enable(all_threads=True)
    try:
        return _train(args, config, distributed=True)
    finally:
        torch.distributed.destroy_process_group()  # on every way out, a refused config included


def _publish_lora_file(config: DistillConfig, trainer, out_dir: Path) -> None:
    """`lora_file` gets the student LoRA just written to `out_dir` (process 0 copies its bytes: nothing is gathered or
    exported a second time)."""
    written = out_dir / LORA_FILE
    if config.lora_file and trainer.rank == 0 and written.is_file():
        atomic_write_bytes(Path(config.lora_file).expanduser(), written.read_bytes())


def check_lora_file(config: DistillConfig, resuming: bool) -> None:
    """`lora_file` may be replaced only by a resumed run, and only when it holds a TDM student (its header says so):
    a fresh run never overwrites a file, and no run overwrites a LoRA it did not write."""
    if not config.lora_file:
        return
    path = Path(config.lora_file).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"lora_file {config.lora_file!r}: the folder {str(path.parent)!r} does not exist")
    if not path.exists():
        return
    if not resuming:
        raise ConfigError(f"lora_file {config.lora_file!r} already exists; name another file, or pass --resume to "
                          "continue the run that wrote it")
    from ..lora.files import safetensors_metadata
    from ..lora.metadata import FORMAT_NOTE, TRAINED_HERE_NOTE

    try:
        student = safetensors_metadata(path).get(FORMAT_NOTE) == TRAINED_HERE_NOTE
    except (OSError, ValueError):
        student = False
    if not student:
        raise ConfigError(f"lora_file {config.lora_file!r} exists and is not a TDM student LoRA; this run will not "
                          "replace it: name another file")


def _train(args, config: DistillConfig, *, distributed: bool) -> int:
    from .trainer import TDMTrainer

    try:
        check_lora_file(config, bool(args.resume))
        backend = build_backend(config)
        out_dir = Path(config.output_dir)
        if args.resume:
            source = out_dir if args.resume == "auto" else Path(args.resume)
            found = find_checkpoint(source)  # a checkpoint folder itself, or a run folder's newest
            if found is None:
                print(f"no checkpoint in {source}; starting a new run", file=sys.stderr)
                trainer = TDMTrainer(backend, config)
            else:
                trainer = TDMTrainer.resume(found, backend, config)
        else:
            trainer = TDMTrainer(backend, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    main_process = trainer.rank == 0
    if config.parallel == "fsdp" and not trainer.sharded and main_process:
        print("parallel fsdp with one process: nothing to shard across, training unsharded", file=sys.stderr)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "config.json")
    preview_prompts = config.preview_prompts or list(dict.fromkeys(config.prompts))[:4]
    progress = None
    if main_process and not args.no_progress:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=config.iterations, initial=trainer.step_count, desc="TDM", unit="it")
        except ImportError:
            progress = None
    log = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if main_process else None  # noqa: SIM115
    started = time.perf_counter()

    def on_step(trainer, metrics):
        step = metrics["step"]
        if main_process:
            if step % config.log_every == 0 or step == config.iterations:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss_gen=f"{metrics['loss_gen']:.4g}", loss_fake=f"{metrics['loss_fake']:.4g}")
            elif step % max(1, config.iterations // 20) == 0:
                print(f"step {step}/{config.iterations} loss_gen {metrics['loss_gen']:.4g} "
                      f"loss_fake {metrics['loss_fake']:.4g}", flush=True)
        if config.preview_every and step % config.preview_every == 0:
            _write_preview(trainer, out_dir, preview_prompts)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            trainer.save_checkpoint(out_dir)
            _publish_lora_file(config, trainer, out_dir)  # progress shows in ComfyUI too

    try:
        if config.preview_every and trainer.step_count == 0:
            _write_preview(trainer, out_dir, preview_prompts)
        try:
            trainer.train(config.iterations, callback=on_step)
            if not (config.checkpoint_every and trainer.step_count % config.checkpoint_every == 0):
                trainer.save_checkpoint(out_dir)
            if getattr(backend, "mode", "lora") == "lora":  # every process: under FSDP the adapter is gathered
                trainer.export_student_lora(out_dir / LORA_FILE)
                _publish_lora_file(config, trainer, out_dir)
        except (NonFiniteTrainingError, NonFiniteWeightsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        # every process's peak memory and share of the teacher's weights (under FSDP its shards), in the summary of
        # process 0 (what a multi-GPU run costs each device)
        own = (_peak_memory_mb(), trainer.local_base_parameters())
        per_process = [own]
        if distributed:
            per_process = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_process, own)
        if main_process and getattr(backend, "mode", "lora") == "lora":
            summary = {"done": True, "step": trainer.step_count, "seconds": round(time.perf_counter() - started, 3),
                       "output_dir": str(out_dir), "world_size": trainer.world, "parallel": config.parallel,
                       "sharded": trainer.sharded, "peak_memory_mb": [peak for peak, _ in per_process],
                       "local_base_parameters": [count for _, count in per_process]}
            print(json.dumps(summary), flush=True)
        if distributed:
            # every process leaves together: a process that tears its gloo group down while process 0 still
            # exports the LoRA can abort the other ("terminate called without an active exception", seen under load)
            torch.distributed.barrier()
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
    return 0
