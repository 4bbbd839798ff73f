"""The TDM training iteration (docs/tdm_method.md §2) and the trainer that runs, samples and checkpoints it.

One `TDMTrainer.step()`:
  1. K-step student rollout from pure noise labelled t_0 on the grid, no grad, keeping the K states x_{t_k} and the
     student's (x̂0, ε̂) at each;
  2. fake-score update: per sample a state index j, t_g = t_j, t_mid (optionally jittered, "randmid"), τ; DDIM jump
     x_mid = α_mid x̂0 + σ_mid ε̂, forward kernel to τ with fresh z, mixed noise m, importance weight w_IS;
     L_fake = mean_b[ mean_d((x0(F(x_τ, τ, c)) − x̂0)²) · min(SNR_τ, 5) · w_IS ], AdamW step at lr;
  3. generator update with fresh draws: the student step at t_g with grad, x_τ as above (no grad), CFG teacher
     target r (conditional and unconditional in one batched forward), fake f; loss against stopgrad(x̂0 + r − f)
     normalised by mean|x̂0 − r|; clip to 1.0; AdamW step at lr/5.

Reuse: the fake update takes (x̂0, ε̂) of its state from the rollout instead of recomputing the student forward
(identical weights and inputs, so the same numbers) and skips the demo's discarded teacher forward; with cfg = 1
the unconditional teacher pass is skipped (its weight is zero). Per iteration: K student forwards, 1 fake
forward/backward, 1 student forward/backward, 1 batched teacher forward (2B), 1 fake forward.

Passes (`config.micro_batch` = m > 0): every network pass of an iteration takes at most m rows (rollout samples, or
an update's rows); an update over more rows runs its forward/backward pass by pass, each pass's loss weighted by its
share of the rows, and steps the optimiser once on the summed gradients: the same update to round-off, with the
activations of m rows instead of all of them (Flow-Factory backpropagates its K stages one by one the same way). The
guided teacher pass then runs its conditional and unconditional halves apart when together they would exceed m.

Precision: the samples, x̂0/ε̂, α/σ and every loss are float32; a bf16/fp16 teacher runs under autocast with float32
adapters and optimiser state (`PeftBackend`). fp16 losses are scaled (`torch.amp.GradScaler`, as fp16 training
needs: small gradients underflow to 0 otherwise). An update whose loss or gradients are non-finite is skipped
(fp16's overflowing scale included) and reported in the metrics; `MAX_SKIPPED_IN_A_ROW` skips in a row, or adapter
weights that become non-finite, end training with `NonFiniteTrainingError` before anything is saved.

Randomness comes from one CPU `torch.Generator` seeded by `config.seed`; every draw is made for the whole global
batch and each data-parallel process takes its slice, so N processes on B/N samples each reproduce one process on
B samples (gradients are averaged across processes before clipping and the optimiser steps).

`config.parallel = "fsdp"` (more than one process): the backend's network, frozen base and both adapters, is sharded
with torch's `fully_shard` (sharding.py) once the adapters exist; FSDP then averages the gradients (reduce-scatter),
each process's AdamW holds its shards' state, the gradient norm and the skip decision are reduced across processes,
every process runs the same network evaluations (each forward is collective), and checkpoints gather full tensors.
The same draws and slices as data parallelism, so the numbers are those of one process on the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..lora import metadata as lora_metadata
from ..schedules import even_timesteps
from . import losses, sharding
from .backend import COMPUTE_DTYPES, forward_pair, slice_cond
from .config import RANDMID_MARGIN, TAU_MIN, ConfigError, DistillConfig

# fp16's loss scale starts at 2¹⁶ and halves on each overflow: 20 skips in a row are far past any transient.
MAX_SKIPPED_IN_A_ROW = 20


class NonFiniteTrainingError(RuntimeError):
    """Training cannot go on: non-finite losses/gradients for too long, or adapter weights that became non-finite.
    Nothing of the step that caused it is saved; the last checkpoint and LoRA are the last good ones."""


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _uniform_int(lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform integers in [lo, hi) per element (hi > lo)."""
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    return torch.minimum(lo + torch.floor(u * (hi - lo).double()).long(), hi - 1)


def _allreduce_mean_(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _lr_decay(config: DistillConfig) -> Callable[[int], float]:
    """The learning-rate factor after s updates: 1 ("constant", official), or a half cosine from 1 to 0 over
    config.iterations ("cosine"; a resume with more iterations stretches what is left of it)."""
    if config.lr_decay == "constant":
        return lambda s: 1.0
    total = max(1, config.iterations)
    return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))


def _adamw(params: list[torch.nn.Parameter], **settings) -> torch.optim.AdamW:
    """AdamW as one fused kernel where torch has it for these parameters (CPU and CUDA, float32 adapters), else
    torch's default implementation: the adapters are hundreds of small tensors, and the per-tensor loop cost an
    update more than a millisecond of host time on the toy teacher. The same update rule either way."""
    if params:
        try:
            return torch.optim.AdamW(params, fused=True, **settings)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(params, **settings)


class TDMTrainer:
    """TDM distillation of `backend`'s teacher into a K-step student (see the module docstring)."""

    def __init__(self, backend, config: DistillConfig):
        schedule = backend.schedule
        config.validate(num_timesteps=schedule.num_timesteps)
        self.backend = backend
        self.config = config
        self.rank, self.world = _dist()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {self.world} processes")
        self.local_batch = config.batch_size // self.world
        self.grid = config.grid()
        self.mids = config.mid_timesteps()
        self.grid_top = config.grid_top()
        self.alphas = schedule.alphas
        self.sigmas = schedule.sigmas
        self.num_timesteps = schedule.num_timesteps
        # the flow-equivalent noise level σ/(α + σ) of each timestep (σ itself for a flow schedule), increasing in t:
        # the logit-normal τ density is drawn on it
        self.flow_levels = (self.sigmas / (self.alphas + self.sigmas)).clamp(1e-12, 1 - 1e-12).contiguous()
        # rows of one update per sample: 1, or K when every sample trains all K steps of its trajectory
        self.rows_per_sample = len(self.grid) if config.stages == "all" else 1
        self._device_tables: dict = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self.skipped_in_a_row = 0
        self._updated: list[torch.nn.Parameter] = []  # adapter weights the current iteration's updates changed
        if config.dtype != "auto":
            set_dtype = getattr(backend, "set_compute_dtype", None)
            if set_dtype is None and getattr(backend, "compute_dtype", torch.float32) != COMPUTE_DTYPES[config.dtype]:
                raise ValueError(f"dtype {config.dtype} was asked for, but this backend cannot change its dtype")
            if set_dtype is not None:
                set_dtype(COMPUTE_DTYPES[config.dtype])
        self.compute_dtype = getattr(backend, "compute_dtype", torch.float32)
        # One process has nothing to shard across: "fsdp" then trains unsharded, as "ddp" does (config.py).
        self.sharded = config.parallel == "fsdp" and self.world > 1
        if self.sharded:
            self._shard_backend()
        betas = tuple(float(b) for b in config.adam_betas)
        self.fake_params = list(backend.trainable_parameters("fake"))
        self.student_params = list(backend.trainable_parameters("student"))
        self.opt_fake = _adamw(self.fake_params, lr=config.lr, betas=betas, eps=config.adam_eps,
                               weight_decay=config.weight_decay)
        self.opt_gen = _adamw(self.student_params, lr=config.student_learning_rate(), betas=betas,
                              eps=config.adam_eps, weight_decay=config.weight_decay)
        warmup, decay = config.lr_warmup_steps, _lr_decay(config)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt_gen, lambda s: (min(1.0, (s + 1) / warmup) if warmup else 1.0) * decay(s))
        self.lr_schedule_fake = torch.optim.lr_scheduler.LambdaLR(self.opt_fake, decay)
        # The moving average of the student's weights (config.student_ema), float32 like the adapters; under FSDP each
        # process averages its own shards. `student_ema_updates` counts the updates it has taken in.
        self.student_ema = [p.detach().float().clone() for p in self.student_params] if config.student_ema else None
        self.student_ema_updates = 0
        scaled = self.compute_dtype == torch.float16
        self.scaler_fake = torch.amp.GradScaler(self.device.type, enabled=scaled)
        self.scaler_gen = torch.amp.GradScaler(self.device.type, enabled=scaled)

    def _shard_backend(self) -> None:
        """Shards the backend's network across the processes (before the optimisers see its parameters, which
        sharding replaces)."""
        if self.compute_dtype == torch.float16:  # a float16 model under dtype "auto"; config.py refuses the rest
            raise ConfigError("parallel 'fsdp' cannot train over a float16 teacher: float16's loss scaler would find "
                             "overflows in each process's gradient shard alone and the processes' scales would drift "
                             "apart; use dtype bfloat16, or parallel 'ddp'")
        shard = getattr(self.backend, "shard", None)
        if shard is None:
            raise ConfigError(f"parallel 'fsdp' needs a backend that can shard its network ({type(self.backend).__name__}"
                             " has no shard(mesh)); use parallel 'ddp'")
        params = list(self.backend.trainable_parameters("student"))
        device = params[0].device if params else torch.device("cpu")
        shard(sharding.device_mesh(self.world, device))

    @property
    def device(self) -> torch.device:
        params = self.student_params or self.fake_params
        return params[0].device if params else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the trainer's samples and coefficients: float32 over any teacher dtype."""
        return torch.float32

    # ---- random draws (whole global batch, then this process's slice) ----------------------------------------------
    def _local(self, t: torch.Tensor, rows_per_sample: int = 1) -> torch.Tensor:
        start, count = self.rank * self.local_batch * rows_per_sample, self.local_batch * rows_per_sample
        return t[start : start + count]

    def _draw_segment(self, fake: bool = False) -> dict[str, torch.Tensor]:
        """j, t_g, t_mid, τ and z for one update (docs/tdm_method.md §2), one row per (sample, trained step): one row
        per sample with a random step j (official) or its last step ("last" stages), or K rows per sample,
        j = 0..K−1 ("all" stages). "sample" is the row's index into this process's rollout batch. A `fake` update's
        draw under fake_samples "output" takes every row at the last step, τ up to the schedule's end."""
        b, g, rows = self.config.batch_size, self.generator, self.rows_per_sample
        output = fake and self.config.fake_samples == "output"
        last = self.config.stages == "last" or output
        if rows == 1:  # "one": a random step per sample; "last": the last step, drawing nothing
            j = torch.full((b,), len(self.grid) - 1) if last else torch.randint(len(self.grid), (b,), generator=g)
            sample = torch.arange(b)
        else:  # sample-major, so each process's slice holds its own samples' rows
            j = torch.full((rows * b,), len(self.grid) - 1) if output else torch.arange(rows).repeat(b)
            sample = torch.arange(b).repeat_interleave(rows)
        t_g = torch.tensor(self.grid)[j]
        t_mid = torch.tensor(self.mids)[j]
        if self.config.randmid and not output:  # the output is the last x̂0 itself (t_mid = 0)
            t_mid = _uniform_int(t_mid, t_g - RANDMID_MARGIN, g)
        lo = torch.clamp(t_mid, min=TAU_MIN)
        upper = self.num_timesteps if output else self.config.tau_upper(t_g, self.num_timesteps)
        hi = torch.broadcast_to(torch.as_tensor(upper), t_g.shape)
        if self.config.tau_density == "logit_normal":
            tau = self._logit_normal_int(lo, hi, g)
        else:
            tau = _uniform_int(lo, hi, g)
        z = torch.randn((len(j), *self.backend.latent_shape), generator=g)
        sample = sample - self.rank * self.local_batch
        # drawn on the CPU generator (reproducible on any device), then moved once per draw; the largest state index
        # of this process's slice is read here, on the CPU, so the rollout's length costs no device sync
        draw = {k: self._local(v, rows).to(self.device)
                for k, v in dict(j=j, t_g=t_g, t_mid=t_mid, tau=tau, z=z, sample=sample).items()}
        draw["j_max"] = int(self._local(j, rows).max())
        draw["j_max_global"] = int(j.max())  # FSDP: every process runs the rollout the longest slice needs
        return draw

    def _logit_normal_int(self, lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Integer τ in [lo, hi) whose flow-equivalent noise level s = σ/(α + σ) follows a logit-normal
        (tau_logit_mean, tau_logit_std) truncated to [s(lo), s(hi − 1)]: by inverting the normal's CDF between the
        two ends (on the reflected side for intervals right of the mean, where 1 − Φ keeps its precision), then
        taking the first timestep at or above the drawn s. For a flow schedule s is σ itself."""
        cfg, s_table = self.config, self.flow_levels
        z_lo = (torch.logit(s_table[lo]) - cfg.tau_logit_mean) / cfg.tau_logit_std
        z_hi = (torch.logit(s_table[hi - 1]) - cfg.tau_logit_mean) / cfg.tau_logit_std
        reflect = z_lo > 0
        a, b = torch.where(reflect, -z_hi, z_lo), torch.where(reflect, -z_lo, z_hi)
        cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
        u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
        z = torch.special.ndtri((cdf_a + u * (cdf_b - cdf_a)).clamp(1e-300, 1 - 1e-16))
        z = torch.where(reflect, -z, z)
        s = torch.sigmoid(cfg.tau_logit_mean + cfg.tau_logit_std * z)
        tau = torch.searchsorted(s_table, s.contiguous())
        return torch.minimum(torch.maximum(tau, lo), hi - 1)

    def _tables(self, device: torch.device):
        """α, σ and SNR as tensors on `device`, made once per device (a parked job moves to the CPU and back):
        every lookup is then a gather on the device, not a CPU gather and a copy. float64 as the schedule keeps them
        (float32 on MPS, which has no float64); the samples get them in float32."""
        tables = self._device_tables.get(device)
        if tables is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            alphas, sigmas = self.alphas.to(device, dtype), self.sigmas.to(device, dtype)
            tables = (alphas, sigmas, (alphas / sigmas) ** 2)
            self._device_tables = {device: tables}
        return tables

    def _coef(self, t: torch.Tensor):
        alphas, sigmas, _ = self._tables(t.device)
        return alphas[t], sigmas[t]

    # ---- the pieces of one iteration --------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: Any, grid: list[int] | None = None, adapter: str = "student",
                forwards: int | None = None):
        """The deterministic K-step sampler: returns (states, x̂0s, ε̂s), lists over the grid, no grad.

        `forwards` stops after that many student evaluations (an iteration needs x̂0/ε̂ at the fake update's state
        and the generator update's state itself: max(j_fake + 1, j_gen) of the K); the states list then ends with
        the state the last evaluation leads to. The results up to there are those of the full rollout."""
        grid = self.grid if grid is None else grid
        x = noise
        states, x0s, epss = [], [], []
        for k, t in enumerate(grid):
            if forwards is not None and k >= forwards:
                states.append(x)
                break
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            a, s = self._coef(tt)
            x0, eps = losses.x0_and_eps(self._forward_in_passes(x, tt, cond, adapter), x, a, s,
                                        self.backend.parametrisation)
            states.append(x)
            x0s.append(x0)
            epss.append(eps)
            if k + 1 < len(grid):
                tn = torch.full_like(tt, grid[k + 1])
                x = losses.ddim_renoise(x0, eps, *self._coef(tn))
        return states, x0s, epss

    def _noised(self, x0: torch.Tensor, eps: torch.Tensor, draw: dict):
        """x_τ (DDIM jump to t_mid, forward kernel to τ) and the mixed noise m, from detached x̂0, ε̂."""
        a_mid, s_mid = self._coef(draw["t_mid"])
        a_tau, s_tau = self._coef(draw["tau"])
        z = draw["z"].to(device=x0.device, dtype=x0.dtype)
        x_mid = losses.ddim_renoise(x0, eps, a_mid, s_mid)
        x_tau = losses.forward_kernel(x_mid, z, a_mid, s_mid, a_tau, s_tau)
        m = losses.mixed_noise(eps, z, a_mid, s_mid, a_tau, s_tau)
        return x_tau, m, z

    def _x0(self, prediction, x, t):
        return losses.x0_from_prediction(prediction, x, *self._coef(t), self.backend.parametrisation)

    def _gather(self, per_step: list[torch.Tensor], draw: dict) -> torch.Tensor:
        """Each row's value at its step j of its sample's trajectory."""
        stacked = torch.stack(per_step)
        return stacked[draw["j"].to(stacked.device), draw["sample"].to(stacked.device)]

    def _passes(self, rows: int) -> list[slice]:
        """The row slices of one update's network passes: all rows at once, or `micro_batch` rows each."""
        size = self.config.micro_batch or rows
        return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]

    @staticmethod
    def _rows(draw: dict, rows: slice) -> dict:
        """A draw's per-row tensors for the rows of one pass."""
        return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in draw.items()}

    def _forward_in_passes(self, x: torch.Tensor, t: torch.Tensor, cond, adapter: str) -> torch.Tensor:
        """backend.forward without gradients, `micro_batch` rows at a time (one call when they all fit)."""
        passes = self._passes(x.shape[0])
        if len(passes) == 1:
            return self.backend.forward(x, t, cond, adapter)
        return torch.cat([self.backend.forward(x[p], t[p], slice_cond(cond, p), adapter) for p in passes])

    def fake_update(self, rollout, cond, draw) -> dict[str, float]:
        states, x0s, epss = rollout
        x0_hat, eps_hat = self._gather(x0s, draw), self._gather(epss, draw)
        with torch.no_grad():
            x_tau, m, z = self._noised(x0_hat, eps_hat, draw)
            w_is = losses.importance_weight(m, z, self.config.importance_clip)
        tau = draw["tau"]
        snr = self._tables(tau.device)[2][tau]

        def pass_loss(p: slice):
            fake_x0 = self._x0(self.backend.forward(x_tau[p], tau[p], slice_cond(cond, p), "fake"), x_tau[p], tau[p])
            return losses.fake_score_loss(fake_x0, x0_hat[p], snr[p], w_is[p], self.config.snr_clamp), None

        total, _ = self._backward_in_passes(x0_hat.shape[0], self.scaler_fake, pass_loss)
        grad_norm, applied = self._apply_update(total, self.opt_fake, self.scaler_fake, self.fake_params,
                                                self.config.grad_clip_fake, self.lr_schedule_fake)
        return {"loss_fake": total, "grad_norm_fake": grad_norm.detach(), "is_weight": w_is.mean(),
                "skipped_fake": torch.tensor(float(not applied))}

    def generator_update(self, rollout, cond, uncond, draw) -> dict[str, float]:
        states = rollout[0]
        x_tg = self._gather(states, draw)
        total, weights = self._backward_in_passes(
            x_tg.shape[0], self.scaler_gen,
            lambda p: self._generator_loss(x_tg[p], slice_cond(cond, p), slice_cond(uncond, p), self._rows(draw, p)))
        grad_norm, applied = self._apply_update(total, self.opt_gen, self.scaler_gen, self.student_params,
                                                self.config.grad_clip, self.lr_schedule)
        if applied and self.student_ema is not None:
            self._update_student_ema()
        return {"loss_gen": total, "grad_norm_gen": grad_norm.detach(), "w_mean": weights.mean(),
                "skipped_gen": torch.tensor(float(not applied))}

    def _generator_loss(self, x_tg, cond, uncond, draw):
        """The generator loss of some rows (the student's step with gradients, the teacher's and the fake score's
        targets without) and its per-row normalisation w."""
        t_g = draw["t_g"]
        pred = self.backend.forward(x_tg, t_g, cond, "student")
        x0_hat, eps_hat = losses.x0_and_eps(pred, x_tg, *self._coef(t_g), self.backend.parametrisation)
        tau = draw["tau"]
        with torch.no_grad():
            x_tau, _, _ = self._noised(x0_hat.detach(), eps_hat.detach(), draw)
            if self.config.cfg != 1.0:
                if self.config.micro_batch and 2 * x_tau.shape[0] > self.config.micro_batch:
                    # one pass would take twice the rows: the conditional and unconditional passes one after the other
                    p_c = self.backend.forward(x_tau, tau, cond, "teacher")
                    p_u = self.backend.forward(x_tau, tau, uncond, "teacher")
                else:
                    p_c, p_u = forward_pair(self.backend, x_tau, tau, cond, uncond, "teacher")
                r = losses.cfg_target(self._x0(p_c, x_tau, tau), self._x0(p_u, x_tau, tau), self.config.cfg)
            else:
                r = self._x0(self.backend.forward(x_tau, tau, cond, "teacher"), x_tau, tau)
            f = self._x0(self.backend.forward(x_tau, tau, cond, "fake"), x_tau, tau)
        return losses.generator_loss(x0_hat, r, f, self.config.generator_loss, self.config.huber_c)

    def _backward_in_passes(self, rows: int, scaler, pass_loss):
        """An update's backward over its `rows` rows, pass by pass (`_passes`): `pass_loss(rows slice)` gives the
        mean loss of those rows (and a per-row tensor kept for the metrics, or None); each pass's loss is weighted by
        its share of the rows, so the gradients add up to those of the mean over all rows (loss-scaled in fp16) until
        _apply_update. Returns (the summed, detached loss, the per-row tensors concatenated or None)."""
        total, kept = None, []
        for p in self._passes(rows):
            loss, per_row = pass_loss(p)
            if p.stop - p.start < rows:
                loss = loss * ((p.stop - p.start) / rows)
            scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
            if per_row is not None:
                kept.append(per_row)
        return total, torch.cat(kept) if kept else None

    def _apply_update(self, loss, optimizer, scaler, params, clip: float | None, schedule):
        """After the update's backward passes (`_backward_in_passes`; `loss` is their summed, detached loss): gradient
        averaging across processes, unscaling, optional clipping, and the optimiser step with its learning-rate
        schedule's step — unless the loss or the gradients are non-finite, when the step is skipped (and fp16's
        loss scale lowered). Returns (gradient norm, applied). Gradients are None before an update's first pass and
        after it (the trainer never leaves them set), so nothing accumulates across updates."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.sharded:
            # FSDP has averaged the gradients (reduce-scatter) into each process's shard; the norm is reduced over
            # the shards, with whether each process's loss is finite, so every process applies or skips alike.
            # (No loss scaling: float16 is refused under FSDP.)
            grad_norm, finite = sharding.global_norm(grads, loss)
            if clip is not None:
                sharding.clip_(grads, grad_norm, clip)
            applied = bool(finite & torch.isfinite(grad_norm))
        else:
            _allreduce_mean_(grads, self.world)  # identical gradients on every process, so every process skips alike
            scaler.unscale_(optimizer)
            if clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            applied = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))  # one host sync per update
        if applied:
            scaler.step(optimizer)
            schedule.step()
            self._updated.extend(params)
        for param in params:  # what zero_grad(set_to_none=True) does, without its per-call profiling wrapper
            param.grad = None
        scaler.update()
        return grad_norm, applied

    @torch.no_grad()
    def _update_student_ema(self) -> None:
        """ema ← d·ema + (1 − d)·weights with d = min(decay, (n − 1) / n) at the n-th update: the plain average of the
        updates so far until 1 / (1 − decay) of them, then the exponential average (so the untrained first weights
        do not linger in a short run)."""
        self.student_ema_updates += 1
        n = self.student_ema_updates
        decay = min(self.config.student_ema, (n - 1) / n)
        torch._foreach_lerp_(self.student_ema, [p.detach().float() for p in self.student_params], 1.0 - decay)

    @contextlib.contextmanager
    def averaged_student(self, adapter: str = "student"):
        """Inside: the student adapter holds its moving average (config.student_ema), as the saved LoRA and the
        previews use it; the trained weights are restored on leaving. Without an average, or for another `adapter`
        (the teacher, the fake score): the weights as they are."""
        if self.student_ema is None or adapter != "student":
            yield
            return
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.student_params]
            for param, average in zip(self.student_params, self.student_ema, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(self.student_params, trained, strict=True):
                    param.copy_(weights)

    def _check_updated_weights(self, metrics: dict) -> None:
        """The adapter weights this iteration updated are finite (one check for both updates, before anything of
        the iteration can be saved): a finite loss and finite gradients can still overflow AdamW's moments."""
        updated, self._updated = self._updated, []
        if self.sharded:  # each process holds shards: the norm over all of them, the same verdict everywhere
            finite = not updated or bool(torch.isfinite(sharding.global_norm(updated)[0]))
        else:
            finite = not updated or bool(torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in updated])))
        if not finite:
            raise NonFiniteTrainingError(
                f"the adapter weights became non-finite at step {self.step_count + 1} (finite losses: loss_fake "
                f"{float(metrics['loss_fake']):.4g}, loss_gen {float(metrics['loss_gen']):.4g}); nothing of this step "
                "was saved. Lower the learning rate, or resume from the last checkpoint.")

    def step(self) -> dict[str, float]:
        """One TDM iteration; returns its metrics (averaged over processes)."""
        start = time.perf_counter()
        cfg, g = self.config, self.generator
        prompt_index = self._local(torch.randint(len(cfg.prompts), (cfg.batch_size,), generator=g))
        noise = self._local(torch.randn((cfg.batch_size, *self.backend.latent_shape), generator=g))
        draws_fake = [self._draw_segment(fake=True) for _ in range(cfg.fake_updates)]
        draw_gen = self._draw_segment()
        prompts = [cfg.prompts[i] for i in prompt_index.tolist()]
        cond = self.backend.encode(prompts)
        if self.rows_per_sample == 1:
            row_cond = cond
        else:  # the updates' rows: each sample's conditioning once per trained step
            row_cond = self.backend.encode([p for p in prompts for _ in range(self.rows_per_sample)])
        rows = len(prompts) * self.rows_per_sample
        uncond = self.backend.uncond(rows) if cfg.cfg != 1.0 else None
        # Under FSDP every forward all-gathers, so every process runs the same number of them: the rollout's length is
        # then the whole batch's (the same states and predictions, those of the full rollout, up to its end).
        j_max = "j_max_global" if self.sharded else "j_max"
        forwards = max(max(d[j_max] for d in draws_fake) + 1, draw_gen[j_max])
        trajectory = self.rollout(noise.to(device=self.device, dtype=self.dtype), cond, forwards=forwards)
        fake_metrics = [self.fake_update(trajectory, row_cond, draw) for draw in draws_fake]
        metrics = fake_metrics[0] if len(fake_metrics) == 1 else {  # averaged over the fake updates
            k: torch.stack([m[k] for m in fake_metrics]).mean() for k in fake_metrics[0]}
        metrics["student_steps"] = torch.tensor(float(forwards))
        metrics.update(self.generator_update(trajectory, row_cond, uncond, draw_gen))
        self._check_updated_weights(metrics)
        if self.scaler_gen.is_enabled():
            metrics["loss_scale"] = torch.tensor(float(self.scaler_gen.get_scale()))
        names = sorted(metrics)
        values = torch.stack([metrics[n].float().reshape(()).cpu() for n in names])
        if self.world > 1:
            torch.distributed.all_reduce(values)
            values /= self.world
        self.step_count += 1
        out = {"step": self.step_count}
        out.update({n: float(v) for n, v in zip(names, values.tolist(), strict=True)})
        out["lr_gen"] = self.opt_gen.param_groups[0]["lr"]
        out["lr_fake"] = self.opt_fake.param_groups[0]["lr"]
        out["seconds"] = time.perf_counter() - start
        skipped = out["skipped_fake"] > 0 or out["skipped_gen"] > 0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteTrainingError(
                f"{self.skipped_in_a_row} updates in a row had a non-finite loss or gradients (step {self.step_count}, "
                f"loss_fake {out['loss_fake']:.4g}, loss_gen {out['loss_gen']:.4g}); nothing of them was saved. Lower "
                "the learning rate, use bfloat16 or float32 instead of float16, or check the teacher.")
        return out

    def train(self, iterations: int | None = None, callback: Callable[[TDMTrainer, dict], Any] | None = None):
        """Runs until `step_count == iterations` (default config.iterations); callback(trainer, metrics) after each
        step may return False to stop early. Returns the last metrics."""
        iterations = self.config.iterations if iterations is None else iterations
        metrics = {}
        while self.step_count < iterations:
            metrics = self.step()
            if callback is not None and callback(self, metrics) is False:
                break
        return metrics

    # ---- sampling ---------------------------------------------------------------------------------------------------
    def sample_grid(self, steps: int | None = None) -> list[int]:
        if steps is None or steps == self.config.steps:
            return list(self.grid)
        # spread evenly below the grid's top (the demo rule's Δ = N // K would leave the remainder of N / K under
        # the last step: N = 999 (SD3's grid) and 50 steps would end at t = 67)
        return list(even_timesteps(steps, self.grid_top))

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int | None = None, seed: int = 0, noise: torch.Tensor | None = None,
               adapter: str = "student") -> torch.Tensor:
        """x0 from the student's deterministic sampler on the training grid (or a demo-rule grid of `steps`)."""
        if noise is None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn((len(prompts), *self.backend.latent_shape), generator=g)
        cond = self.backend.encode(list(prompts))
        with self.averaged_student(adapter):
            _, x0s, _ = self.rollout(noise.to(device=self.device, dtype=self.dtype), cond, self.sample_grid(steps),
                                     adapter)
        return x0s[-1]

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "format": "tdm-distill-state/1",
            "step": self.step_count,
            "config": self.config.to_dict(),
            "student": self.backend.adapter_state_dict("student"),
            "fake": self.backend.adapter_state_dict("fake"),
            "opt_gen": self._optimizer_state(self.opt_gen),
            "opt_fake": self._optimizer_state(self.opt_fake),
            "lr_schedule": self.lr_schedule.state_dict(),
            "lr_schedule_fake": self.lr_schedule_fake.state_dict(),
            "generator_rng": self.generator.get_state(),
            "scaler_fake": self.scaler_fake.state_dict(),
            "scaler_gen": self.scaler_gen.state_dict(),
            "skipped_in_a_row": self.skipped_in_a_row,
        }
        if self.student_ema is not None:  # in the adapter's own layout (under FSDP gathered whole, a collective)
            with self.averaged_student():
                state["student_ema"] = self.backend.adapter_state_dict("student")
            state["student_ema_updates"] = self.student_ema_updates
        # No process-wide RNG state: every draw of training comes from `self.generator`, and the process-wide RNG
        # belongs to whatever else runs in the process (ComfyUI's samplers), which a save or resume must not rewind.
        return state

    def _optimizer_state(self, optimizer) -> dict:
        # Under FSDP the state tensors are shards: gathered whole (collective), the format of one process's.
        return sharding.full_optimizer_state(optimizer) if self.sharded else optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Loads a state of any process count (full tensors); under FSDP each process keeps its shards of them."""
        if self.student_ema is not None:
            # the average goes through the adapter (it is stored in the adapter's layout), before the weights do; a
            # state saved without one starts the average at its weights
            self.backend.load_adapter_state_dict("student", state.get("student_ema", state["student"]))
            self.student_ema = [p.detach().float().clone() for p in self.student_params]
            self.student_ema_updates = int(state.get("student_ema_updates", 0))
        self.backend.load_adapter_state_dict("student", state["student"])
        self.backend.load_adapter_state_dict("fake", state["fake"])
        for optimizer, params, name in ((self.opt_gen, self.student_params, "opt_gen"),
                                        (self.opt_fake, self.fake_params, "opt_fake")):
            optimizer.load_state_dict(sharding.sharded_optimizer_state(state[name], params) if self.sharded
                                      else state[name])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if "lr_schedule_fake" in state:  # states saved before it existed had a constant fake-score lr
            self.lr_schedule_fake.load_state_dict(state["lr_schedule_fake"])
        # The optimisers' restored rates are the schedule's for the stored run; this config's may be longer (a resume
        # with more iterations stretches what is left of a decay): the next update takes this schedule's rate at the
        # restored step, as every later one does (the same value when the run's length is unchanged).
        for schedule in (self.lr_schedule, self.lr_schedule_fake):
            for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas,
                                           strict=True):
                group["lr"] = base * factor(schedule.last_epoch)
        self.generator.set_state(state["generator_rng"])
        for name, scaler in (("scaler_fake", self.scaler_fake), ("scaler_gen", self.scaler_gen)):
            if state.get(name) and scaler.is_enabled():  # a resume in another dtype starts a fresh loss scale
                scaler.load_state_dict(state[name])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.step_count = int(state["step"])

    def save_checkpoint(self, directory: str | Path) -> Path | None:
        """Writes a resumable state under `directory` (atomically; keeps config.keep_last) and the student LoRA
        next to it. Only process 0 writes; returns the checkpoint folder (None on other processes). Under FSDP
        every process must call it: the full state is gathered from all of them."""
        from .checkpoint import save_checkpoint, student_lora

        if self.sharded:
            state, lora = self.state_dict(), student_lora(self)  # collectives: every process gathers
            path = save_checkpoint(self, directory, state=state, lora=lora) if self.rank == 0 else None
        else:
            path = save_checkpoint(self, directory) if self.rank == 0 else None
        if self.world > 1:
            torch.distributed.barrier()
        return path

    def export_student_lora(self, path: str | Path) -> Path | None:
        """Writes the student LoRA to `path` on process 0 (returns the path there, None elsewhere). Every process
        calls it: under FSDP the adapter is gathered from all of them."""
        from .checkpoint import student_lora, write_lora

        if self.rank != 0 and not self.sharded:
            return None
        tensors, metadata = student_lora(self)  # under FSDP a collective: every process gathers
        return write_lora(path, tensors, metadata) if self.rank == 0 else None

    def local_base_parameters(self) -> int | None:
        """Elements of the frozen teacher this process holds (under FSDP its shards'); None if the backend cannot
        say."""
        count = getattr(self.backend, "local_base_parameters", None)
        return count() if count is not None else None

    @classmethod
    def resume(cls, path: str | Path, backend, config: DistillConfig | None = None) -> TDMTrainer:
        """A trainer continuing from a checkpoint folder or a run folder (its newest checkpoint). `config`
        replaces the stored one (e.g. more iterations); it must describe the same run."""
        from .checkpoint import load_checkpoint

        state = load_checkpoint(path)
        trainer = cls(backend, config or DistillConfig.from_dict(state["config"]))
        trainer.load_state_dict(state)
        return trainer

    def export_metadata(self) -> dict[str, str]:
        """The student LoRA's TDM header entries (tdm_core.lora.metadata, the one schema the loader reads)."""
        c = self.config
        return lora_metadata.student_metadata(
            steps=c.steps, grid=c.grid_name(), timesteps=self.grid, parametrisation=self.backend.parametrisation,
            strength=c.recommended_strength, preset=c.sampler_preset, iterations=self.step_count, cfg=c.cfg,
            schedule_kind=self.backend.schedule.kind, recipe=c.recipe, family=c.family)


def nfe_per_iteration(config: DistillConfig) -> int:
    """Network evaluations per sample and iteration (batched cond+uncond counted as 2): the K-step rollout, then per
    trained step (K of them with "all" stages) each fake update's forward and the generator's student, teacher and
    fake forwards."""
    rows = config.steps if config.stages == "all" else 1
    return config.steps + rows * (config.fake_updates + 1 + (2 if config.cfg != 1.0 else 1) + 1)
