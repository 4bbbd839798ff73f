"""TDM distillation (Luo et al., ICCV 2025): a K-step student LoRA from a frozen teacher, data-free.

Stable API (the contract with backends, the toy benchmark, the trainer node and the CLI):

    from tdm_core.distill import DistillConfig, TDMTrainer, PeftBackend, diffusers_backend, DiscreteSchedule

    config = DistillConfig(prompts=["a cat", "a dog"], steps=4, total_steps=900, cfg=4.5, lr=2e-5, batch_size=4)
    backend = diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=my_text_encoder)
    trainer = TDMTrainer(backend, config)        # validates config against backend.schedule before any compute
    metrics = trainer.step()                     # one TDM iteration -> {"step", "loss_fake", "loss_gen", ...}
    trainer.train(500, callback=None)            # until step_count == 500; callback(trainer, metrics) -> False stops
    x0 = trainer.sample(["a cat"], seed=0)       # the student's K-step sampler on the training grid
    trainer.save_checkpoint("run/")              # atomic resumable state + student_lora.safetensors
    trainer = TDMTrainer.resume("run/", backend) # bit-exact continuation on CPU

Backends implement `TeacherBackend` (see backend.py):
    parametrisation: "eps" | "v" | "flow"        what forward returns
    schedule: DiscreteSchedule                   alphas[t], sigmas[t], model_timesteps[t] for integer t in [0, N)
    latent_shape: tuple                          one sample, no batch dim
    family: str                                  LoRA metadata
    encode(prompts: list[str]) -> cond           batched conditioning (tensor / dict / tuple of tensors, batch first)
    uncond(batch: int) -> cond                   the empty prompt's conditioning
    forward(x, t: LongTensor[B], cond, adapter: "teacher"|"student"|"fake") -> raw prediction
    trainable_parameters(adapter) / adapter_state_dict(adapter) / load_adapter_state_dict(adapter, state)
    optional: forward_pair(x, t, cond, uncond, adapter) -> (pred_c, pred_u) (default: one batched forward),
              export_student_lora() -> (tensors, metadata), mode ("lora" | "full").
`PeftBackend(model, schedule=, parametrisation=, latent_shape=, encode=, call=, target_modules=...)` implements it for
any torch module with two named peft adapters ("student", "fake") on the frozen model (teacher = adapters off).

Headless: `python -m tdm_core.distill --config run.toml` (also under `torchrun --nproc_per_node N`).
"""

from .backend import ADAPTERS, PeftBackend, TeacherBackend, concat_conds, diffusers_backend, forward_pair
from .checkpoint import export_student_lora, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, DistillConfig
from .schedule import DiscreteSchedule
from .trainer import TDMTrainer, nfe_per_iteration

__all__ = [
    "ADAPTERS",
    "ConfigError",
    "DiscreteSchedule",
    "DistillConfig",
    "PeftBackend",
    "TDMTrainer",
    "TeacherBackend",
    "concat_conds",
    "diffusers_backend",
    "export_student_lora",
    "forward_pair",
    "latest_checkpoint",
    "load_checkpoint",
    "nfe_per_iteration",
    "save_checkpoint",
]
