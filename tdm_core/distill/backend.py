"""How the trainer reaches a teacher: the `TeacherBackend` protocol and a peft backend for torch modules.

The trainer never calls a network directly. It asks a backend for one of three predictors of the same model:

  "teacher"  the frozen base model (in "lora" mode: every adapter disabled),
  "student"  the few-step generator G (adapter "student"),
  "fake"     the fake score F, which learns the student's distribution (adapter "fake").

`PeftBackend` implements this for any torch module by putting two named peft LoRA adapters on the one frozen model
(the released TDM LoRAs show a LoRA student works), or, in "full" mode, by keeping separate trainable copies (the
official demo's layout; for comparison and the memory benchmark). `diffusers_backend` adds the call conventions,
latent shapes, default target modules and LoRA export names of diffusers' UNet2DConditionModel (SD1.5, ε),
SD3Transformer2DModel (SD3/SD3.5, flow) and CogVideoXTransformer3DModel (CogVideoX, v).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .. import families
from ..lora import metadata as lora_metadata
from . import sharding
from .schedule import DiscreteSchedule

Adapter = Literal["teacher", "student", "fake"]
ADAPTERS = ("teacher", "student", "fake")
TRAINABLE = ("student", "fake")
# The dtypes a frozen teacher may compute in; adapters, their gradients and the optimiser state stay float32.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's frozen (non-adapter) floating-point weights."""
    for name, param in model.named_parameters():
        if ".lora_" not in name and param.is_floating_point():
            return param.dtype
    return torch.float32


@runtime_checkable
class TeacherBackend(Protocol):
    """What `TDMTrainer` needs from a model. Conditionings are opaque to the trainer (tensors, dicts or tuples of
    tensors with the batch first), produced by `encode`/`uncond` and handed back to `forward`."""

    parametrisation: str  # "eps" | "v" | "flow": what `forward` returns
    schedule: DiscreteSchedule  # (α_t, σ_t) for integer t in [0, N)
    latent_shape: tuple[int, ...]  # one sample, without the batch dimension
    family: str  # written into the student LoRA's metadata

    def encode(self, prompts: list[str]) -> Any: ...

    def uncond(self, batch: int) -> Any: ...  # the empty prompt's conditioning, batch times

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, adapter: Adapter) -> torch.Tensor: ...

    def trainable_parameters(self, adapter: Adapter) -> list[torch.nn.Parameter]: ...

    def adapter_state_dict(self, adapter: Adapter) -> dict[str, torch.Tensor]: ...

    def load_adapter_state_dict(self, adapter: Adapter, state: dict[str, torch.Tensor]) -> None: ...


def shared_weights_copy(source: torch.nn.Module, device: torch.device | None = None,
                        dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A module tree of its own whose frozen weights *are* `source`'s tensors (no copy), unless `device` or `dtype`
    asks for another placement, and then only the converted copy exists there. A job trains adapters into it (peft
    wraps the layers it adapts) while `source` goes on sampling unchanged; the process holds the teacher once. Safe
    because the holders of `source` (ComfyUI, a diffusers pipeline) never write into a weight: moving or patching one
    replaces its tensor, so the copy keeps the values it started with."""
    with torch.inference_mode(False):
        memo = {}
        for parameter in source.parameters():
            memo[id(parameter)] = torch.nn.Parameter(_alias(parameter), requires_grad=False)
        for buffer in source.buffers():
            memo[id(buffer)] = _alias(buffer)
        network = copy.deepcopy(source, memo)  # copies modules and attributes; the weights come from the memo
        if device is not None or dtype is not None:
            network.to(device=device, dtype=dtype) if dtype is not None else network.to(device=device)
    network.requires_grad_(False)
    network.eval()
    return network


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as `tensor`. ComfyUI nodes load weights under torch.inference_mode(), and
    autograd refuses to save an inference tensor for backward (every frozen Linear's weight is saved to compute the
    input's gradient); a plain tensor viewing the same storage is allowed. A tensor subclass (quantized weights)
    is copied instead: its storage is not its values."""
    data = tensor.detach()
    if type(data) is not torch.Tensor:
        return data.clone()
    alias = torch.empty(0, dtype=data.dtype, device=data.device)
    alias.set_(data.untyped_storage(), data.storage_offset(), data.size(), data.stride())
    return alias


def concat_conds(a: Any, b: Any) -> Any:
    """Batch-concatenates two conditionings of the same structure (tensor, dict, list/tuple of them, None)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: concat_conds(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(concat_conds(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot batch conditionings of type {type(a).__name__}")


def slice_cond(cond: Any, rows: slice) -> Any:
    """The rows `rows` of a conditioning (tensor, dict, list/tuple of them, None), batch first."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    if isinstance(cond, dict):
        return {k: slice_cond(v, rows) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(slice_cond(v, rows) for v in cond)
    raise TypeError(f"cannot slice a conditioning of type {type(cond).__name__}")


def forward_pair(backend, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, adapter: Adapter):
    """Conditional and unconditional predictions in one batched forward (a backend may provide its own)."""
    own = getattr(backend, "forward_pair", None)
    if own is not None:
        return own(x, t, cond, uncond, adapter)
    out = backend.forward(torch.cat([x, x]), torch.cat([t, t]), concat_conds(cond, uncond), adapter)
    return out.chunk(2)


def switch_adapter(layers: list, adapter: str) -> None:
    """Makes every LoRA layer run `adapter` ("teacher": none), five times an iteration.

    peft's public switch (`enable_adapters` + `set_adapter` per layer) also walks every adapter parameter to set
    `requires_grad` (set_adapter freezes the other adapter; here both must stay trainable, so they had to be walked
    again): ~48 ms of CPU per iteration on a 160-layer UNet. What the layers' forward reads is two attributes of
    peft's `BaseTunerLayer`, `_disable_adapters` and `_active_adapter`; writing just those (into the instance
    dict, as `nn.Module.__setattr__` would for a plain value, without its bookkeeping) is the same switch —
    `tests/test_distill_trainer.py` checks it against the public one. Layers without them take the public path.
    """
    disable = adapter == "teacher"
    active = [adapter]
    for layer in layers:
        state = layer.__dict__
        if "_disable_adapters" in state or hasattr(type(layer), "_disable_adapters"):
            state["_disable_adapters"] = disable
            if not disable:
                state["_active_adapter"] = active
        elif disable:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(adapter)
            for name, param in layer.named_parameters():
                if ".lora_" in f".{name}" and param.is_floating_point():
                    param.requires_grad_(True)


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class PeftBackend:
    """A TeacherBackend over one torch module.

    `call(model, x, model_t, cond)` runs the network (default `model(x, model_t, cond)`), `model_t` being
    `schedule.model_timesteps[t]` in float32 — never in the sample's or the network's dtype: bf16 would turn 999
    into 1000 and 947.17 into 948. `encode(prompts)` gives the conditioning; the unconditional one is the empty
    prompt's. In "lora" mode both adapters start at B = 0 (student = fake = teacher, as the official script starts
    both copies from the teacher), initialised from `adapter_seed`.

    Mixed precision: the frozen base may be bf16/fp16 (`set_compute_dtype`, or a model built in that dtype); the
    adapters are float32 master weights (their gradients and AdamW state too), and the network runs under
    `torch.autocast` in the base's dtype, so the matmuls run in half precision while every update is float32.
    The trainer's samples, x̂0, ε̂ and the α/σ coefficients stay float32; `forward` returns float32.

    FSDP (`shard`): the network's repeated blocks become the units; `fsdp_blocks` names the block lists of a network
    whose names sharding.BLOCK_NAMES does not know (None: those names, else the top-level children).
    """

    fsdp_blocks: tuple[str, ...] | None = None

    def __init__(self, model: torch.nn.Module, *, schedule: DiscreteSchedule, parametrisation: str,
                 latent_shape: tuple[int, ...], encode: Callable[[list[str]], Any],
                 call: Callable | None = None, family: str = "", mode: str = "lora", lora_rank: int = 16,
                 lora_alpha: float | None = None, target_modules: list[str] | str | None = None,
                 export_format: str = "peft", export_prefix: str = "", adapter_seed: int = 0):
        if parametrisation not in ("eps", "v", "flow"):
            raise ValueError(f"parametrisation must be eps, v or flow, got {parametrisation!r}")
        if mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
        self.schedule = schedule
        self.parametrisation = parametrisation
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.family = family
        self.mode = mode
        self.export_format = export_format
        self.export_prefix = export_prefix
        self._encode = encode
        self._call = call or (lambda m, x, t, c: m(x, t, c))
        self._cond_cache: dict[str, Any] = {}
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        if mode == "lora":
            if not target_modules:
                raise ValueError("target_modules is empty: name the modules the LoRA adapters patch")
            from peft import LoraConfig, inject_adapter_in_model

            # a list of module-name suffixes, or one regex peft matches against whole names (Flux's blocks)
            targets = target_modules if isinstance(target_modules, str) else list(target_modules)
            config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=targets,
                                lora_dropout=0.0, init_lora_weights=True)
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                torch.manual_seed(adapter_seed)
                for name in TRAINABLE:
                    inject_adapter_in_model(copy.deepcopy(config), model, adapter_name=name)
            self._layers = _lora_layers(model)
            if not self._layers:
                raise ValueError(f"no module of the model matches target_modules {target_modules}")
            for layer in self._layers:
                # peft casts each LoRA input to the factors' float32, and autocast casts it straight back to the
                # base's bf16/fp16 for the matmul: a lossless round trip (forward and backward alike) that cost two
                # copy kernels per adapted layer and pass (bench/gpu.py: an SD1.5 pass on an H200 is host-bound, and
                # its 160 adapted layers made half its time). Without autocast input and factors are both float32.
                layer.cast_input_dtype_enabled = False
            self._params = {a: [(n, p) for n, p in model.named_parameters() if f".{a}." in n and ".lora_" in n]
                            for a in TRAINABLE}
            for _, p in self._params["student"] + self._params["fake"]:
                # peft creates the factors in the base layer's dtype; they are the float32 master weights here.
                p.data = p.data.float()
                p.requires_grad_(True)
            self._active: str | None = None
            self._models = {a: model for a in ADAPTERS}
        else:
            self._models = {"teacher": model}
            for name in TRAINABLE:
                copy_ = copy.deepcopy(model)
                copy_.requires_grad_(True)
                self._models[name] = copy_
            self._params = {a: list(self._models[a].named_parameters()) for a in TRAINABLE}
        self.compute_dtype = base_dtype(model)
        if mode == "full" and self.compute_dtype != torch.float32:
            raise ValueError("mode 'full' trains full float32 copies of the teacher; give it a float32 model "
                             "(half-precision training is for the LoRA mode: float32 adapters over a half base)")

    def _model_timesteps(self, device: torch.device) -> torch.Tensor:
        """The schedule's network timesteps as float32 on `device`, copied once per device rather than per call."""
        cached = getattr(self, "_timesteps_on_device", None)
        if cached is None or cached.device != device:
            cached = self.schedule.model_timesteps.to(device).float()
            self._timesteps_on_device = cached
        return cached

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Casts the frozen base (every non-adapter weight and floating buffer) to `dtype`; adapters stay float32."""
        if dtype == self.compute_dtype:
            return
        if self.mode == "full":
            raise ValueError("mode 'full' trains full float32 copies of the teacher; half precision is for the "
                             "LoRA mode (float32 adapters over a half-precision base)")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if ".lora_" not in name and param.is_floating_point():
                    param.data = param.data.to(dtype)
            for module in self.model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer.is_floating_point():
                        setattr(module, name, buffer.to(dtype))
        self.compute_dtype = dtype

    # ---- placement ---------------------------------------------------------------------------------------------
    #: Where `to` put the network; encoded prompts are brought there. None: where `encode` returns them.
    device: torch.device | None = None

    def to(self, device: torch.device, keep: frozenset[int] = frozenset()) -> None:
        """Moves the network with its adapters (a job parks a waiting one on the CPU, then brings it back). Each
        Parameter stays the same object, so an optimiser's references stay valid. Tensors whose memory is in `keep`
        stay where they are: weights another holder keeps on the device itself (parking them would free nothing there
        and add a copy on the CPU)."""
        device = torch.device(device)
        for table, name, tensor in self.tensors_to_move(device, keep):
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = tensor.data.to(device)
            else:
                table[name] = tensor.to(device)
        self.device = device
        self._cond_cache.clear()

    def tensors_to_move(self, device: torch.device, keep: frozenset[int] = frozenset()):
        """(table, name, tensor) of each parameter and buffer `to(device, keep)` moves: those not on `device` yet
        whose memory is not in `keep`."""
        for model in {id(m): m for m in self._models.values()}.values():
            for module in model.modules():
                for table in (module._parameters, module._buffers):
                    for name, tensor in table.items():
                        if tensor is not None and tensor.device != device and tensor.data_ptr() not in keep:
                            yield table, name, tensor

    # ---- conditioning ------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Any:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            for i, prompt in enumerate(missing):
                cond = _index_cond(encoded, i)
                self._cond_cache[prompt] = cond if self.device is None else _cond_to(cond, self.device)
        return _stack_conds([self._cond_cache[p] for p in prompts])

    def uncond(self, batch: int) -> Any:
        return self.encode([""] * batch)

    # ---- prediction ----------------------------------------------------------------------------------------------
    def _activate(self, adapter: str) -> None:
        if self.mode != "lora" or adapter == self._active:
            return
        switch_adapter(self._layers, adapter)
        self._active = adapter

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any, adapter: Adapter) -> torch.Tensor:
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        self._activate(adapter)
        model_t = self._model_timesteps(x.device)[t.to(x.device)]
        if self.compute_dtype == torch.float32:
            return self._call(self._models[adapter], x, model_t, cond).float()
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            out = self._call(self._models[adapter], x, model_t, cond)
        return out.float()

    # ---- parameters ------------------------------------------------------------------------------------------------
    def trainable_parameters(self, adapter: Adapter) -> list[torch.nn.Parameter]:
        return [p for _, p in self._params[adapter]]

    def adapter_state_dict(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """Full tensors (sharded ones gathered: collective under FSDP, every process calls it)."""
        return {n: sharding.full(p.detach()).clone() for n, p in self._params[adapter]}

    def load_adapter_state_dict(self, adapter: Adapter, state: dict[str, torch.Tensor]) -> None:
        own = dict(self._params[adapter])
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise KeyError(f"adapter '{adapter}' state does not match the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
        # A checkpoint is read from disk: a tensor of another shape would be broadcast by copy_ into a silently
        # wrong adapter (a rank-1 tensor into a rank-16 one), so every shape is checked before anything is written.
        wrong = [(name, tuple(getattr(state[name], "shape", ())), tuple(param.shape)) for name, param in own.items()
                 if not isinstance(state[name], torch.Tensor) or state[name].shape != param.shape]
        if wrong:
            name, got, want = wrong[0]
            raise ValueError(f"adapter '{adapter}' state does not match the model: {name} has shape {got}, the model's "
                             f"is {want} ({len(wrong)} tensors differ; a checkpoint of another rank or model?)")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(sharding.shard_like(state[name], param))  # under FSDP: this process's shard of it

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights (the teacher), without any adapter tensors (full ones, as adapter_state_dict)."""
        return {n: sharding.full(p.detach()).clone() for n, p in self.model.named_parameters() if ".lora_" not in n}

    # ---- FSDP ------------------------------------------------------------------------------------------------------
    def shard(self, mesh) -> int:
        """Shards the network, base and both adapters, with `fully_shard` over `mesh` (sharding.py); returns the
        number of FSDP units below the root. Parameters become DTensors: the adapter lists are read again."""
        if self.mode != "lora":
            raise ValueError("FSDP shards the frozen teacher and its two LoRA adapters; mode 'full' keeps whole "
                             "trainable copies (use data parallelism for it)")
        units = sharding.shard_model(self.model, mesh, getattr(self, "fsdp_blocks", None))
        self._params = {a: [(n, p) for n, p in self.model.named_parameters() if f".{a}." in n and ".lora_" in n]
                        for a in TRAINABLE}
        self._models = {a: self.model for a in ADAPTERS}
        return units

    def local_base_parameters(self) -> int:
        """Elements of the frozen base this process holds: all of them unsharded, its shards' under FSDP."""
        return sharding.local_numel(p for n, p in self._models["teacher"].named_parameters() if ".lora_" not in n)

    # ---- export ----------------------------------------------------------------------------------------------------
    def export_student_lora(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The student adapter as a LoRA file's tensors + header metadata.

        export_format "kohya" (UNets): `lora_unet_<module path, '.'→'_'>.lora_down.weight / .lora_up.weight /
        .alpha`, the names ComfyUI maps onto an SD1.5 MODEL (it does not map plain peft `unet.*.to_q` names) and the
        format of the released Dreamshaper TDM LoRA. "comfyui" (a ComfyUI network's own module names):
        `diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha`, the keys
        `comfy.lora.model_lora_keys_unet` maps for every model. "peft": `<prefix><module>.lora_A.weight /
        .lora_B.weight` with alpha in diffusers' `lora_adapter_metadata` header entry (prefix "transformer." for SD3
        and CogVideoX).
        """
        if self.mode != "lora":
            raise ValueError("mode 'full' trains a full student copy, not a LoRA; use adapter_state_dict('student')")
        tensors: dict[str, torch.Tensor] = {}
        modules = []
        for name, param in self._params["student"]:
            # "<module>.lora_A.student.weight" -> module, A/B
            module, _, rest = name.partition(".lora_")
            which = rest.split(".")[0]  # "A" or "B"
            value = sharding.full(param.detach()).to("cpu").contiguous().clone()  # collective under FSDP
            if self.export_format in ("kohya", "comfyui"):
                base = ("lora_unet_" + module.replace(".", "_") if self.export_format == "kohya"
                        else f"diffusion_model.{module}")
                tensors[f"{base}.lora_{'down' if which == 'A' else 'up'}.weight"] = value
                tensors[f"{base}.alpha"] = torch.tensor(self.lora_alpha, dtype=torch.float32)
            else:
                tensors[f"{self.export_prefix}{module}.lora_{which}.weight"] = value
            modules.append(module)
        metadata = lora_metadata.adapter_metadata(self.family, self.lora_rank, self.lora_alpha,
                                                  comfy_native=self.export_format == "comfyui")
        if self.export_format not in ("kohya", "comfyui"):
            component = self.export_prefix.rstrip(".")
            lora_config = {"r": self.lora_rank, "lora_alpha": self.lora_alpha,
                           "target_modules": sorted(set(m.split(".")[-1] for m in modules))}
            if component:
                lora_config = {f"{component}.{k}": v for k, v in lora_config.items()}
            metadata[lora_metadata.DIFFUSERS_METADATA_KEY] = json.dumps(lora_config)
        return tensors, metadata


def _cond_to(cond: Any, device: torch.device) -> Any:
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: _cond_to(v, device) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_cond_to(v, device) for v in cond)
    return cond


def _index_cond(cond: Any, i: int) -> Any:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[i : i + 1]
    if isinstance(cond, dict):
        return {k: _index_cond(v, i) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_index_cond(v, i) for v in cond)
    raise TypeError(f"cannot index a conditioning of type {type(cond).__name__}")


def _stack_conds(parts: list) -> Any:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, dict):
        return {k: _stack_conds([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack_conds([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot batch conditionings of type {type(first).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# diffusers models

UNET_TARGETS = list(families.UNET_TARGETS)  # the diffusers UNet uses the names ComfyUI's does
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
COGVIDEOX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# Flux's double blocks (attention and both feed-forwards, as SD3's joint blocks name them) and single blocks (q, k, v
# and the fused MLP in/out: ComfyUI's linear1/linear2), never the model's final proj_out: a regex, as peft takes one
FLUX_TARGETS = (r".*(?<!single_)transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                r"|.*single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)")
FLUX_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, and ComfyUI's (FluxGuidance): the teacher's guidance
# diffusers' Wan names for the native self_attn/cross_attn q, k, v, o and ffn.0/ffn.2 (families.WAN_TARGETS)
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _call_unet(model, x, t, cond):
    return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


def _call_sd3(model, x, t, cond):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                 pooled_projections=cond["pooled_projections"], return_dict=False)[0]


def _call_flux(model, x, t, cond):
    """FluxPipeline's call on unpacked latents [B, 16, H, W]: 2×2 patches packed into tokens with their position ids,
    σ as the timestep, the guidance input, then unpacked."""
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] = torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    context = cond["encoder_hidden_states"]
    text_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = torch.full((b,), FLUX_GUIDANCE, device=x.device, dtype=x.dtype)
    out = model(hidden_states=packed, timestep=t.to(x.dtype).expand(b), guidance=guidance,
                pooled_projections=cond["pooled_projections"], encoder_hidden_states=context, txt_ids=text_ids,
                img_ids=ids.reshape(-1, 3), return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _call_wan(model, x, t, cond):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                 return_dict=False)[0]


def _call_cogvideox(model, x, t, cond):
    return model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                 return_dict=False)[0]


def diffusers_backend(model: torch.nn.Module, *, schedule: DiscreteSchedule, encode: Callable[[list[str]], dict],
                      latent_shape: tuple[int, ...] | None = None, parametrisation: str | None = None,
                      family: str | None = None, **kwargs) -> PeftBackend:
    """A PeftBackend for a diffusers UNet2DConditionModel / SD3Transformer2DModel / CogVideoXTransformer3DModel.

    `encode(prompts)` returns {"encoder_hidden_states": [B, L, D]} (+ "pooled_projections": [B, P] for SD3).
    The student LoRA is exported with the names ComfyUI and tdm_core.lora read: kohya `lora_unet_*` for UNets,
    peft `transformer.*` for SD3 and CogVideoX.
    """
    kind = type(model).__name__
    config = model.config
    if kind == "UNet2DConditionModel":
        defaults = dict(parametrisation="eps", family=families.SD15.name, call=_call_unet, target_modules=UNET_TARGETS,
                        export_format="kohya", export_prefix="",
                        latent_shape=(config.in_channels, config.sample_size, config.sample_size))
    elif kind == "SD3Transformer2DModel":
        dual = bool(getattr(config, "dual_attention_layers", ()) or ())
        defaults = dict(parametrisation="flow", family=(families.SD35 if dual else families.SD3).name, call=_call_sd3,
                        target_modules=SD3_TARGETS, export_format="peft", export_prefix="transformer.",
                        latent_shape=(config.in_channels, config.sample_size, config.sample_size))
    elif kind == "CogVideoXTransformer3DModel":
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        defaults = dict(parametrisation="v", family=families.COGVIDEOX.name, call=_call_cogvideox,
                        target_modules=COGVIDEOX_TARGETS, export_format="peft", export_prefix="transformer.",
                        latent_shape=(frames, config.in_channels, config.sample_height, config.sample_width))
    elif kind == "FluxTransformer2DModel":  # latents [16, H, W] as the VAE gives them; packed in the call
        defaults = dict(parametrisation="flow", family=families.FLUX.name, call=_call_flux, target_modules=FLUX_TARGETS,
                        export_format="peft", export_prefix="transformer.",
                        latent_shape=(config.in_channels // 4, 16, 16))
    elif kind == "WanTransformer3DModel":  # latents [C, T, H, W], as the pipeline feeds them
        defaults = dict(parametrisation="flow", family=families.WAN21.name, call=_call_wan, target_modules=WAN_TARGETS,
                        export_format="peft", export_prefix="transformer.",
                        latent_shape=(config.in_channels, 1, 8 * config.patch_size[1], 8 * config.patch_size[2]))
    else:
        raise TypeError(f"no diffusers backend for {kind}; supported: UNet2DConditionModel, SD3Transformer2DModel, "
                        "CogVideoXTransformer3DModel, FluxTransformer2DModel, WanTransformer3DModel (or build a PeftBackend with your own "
                        "`call`)")
    if latent_shape is not None:
        defaults["latent_shape"] = tuple(latent_shape)
    if parametrisation is not None:
        defaults["parametrisation"] = parametrisation
    if family is not None:
        defaults["family"] = family
    if kwargs.get("target_modules") is None:
        kwargs.pop("target_modules", None)
    defaults.update(kwargs)
    return PeftBackend(model, schedule=schedule, encode=encode, **defaults)
