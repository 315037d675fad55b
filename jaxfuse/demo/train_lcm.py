"""Distils the demo model into a few-step LCM-LoRA (latent consistency distillation), with optax,
on the CPU.

    python -m jaxfuse.demo.train_lcm --workdir runs/lcm                          # resumable
    python -m jaxfuse.demo.train_lcm --workdir runs/lcm --export demo-lcm.safetensors

The teacher is the shipped demo model with classifier-free guidance; the student is the same
UNet with a LoRA on its attention, feed-forward, projection and convolution layers (the teacher's
weights frozen). Each step (Luo et al. 2023, LCM-LoRA's recipe):

1. fresh scenes, encoded by the demo VAE (the mean) and captioned through the demo text encoders;
2. a timestep t_n of the teacher's `ddim_steps`-step grid (LCMScheduler's
   `original_inference_steps`: t_n = (n + 1) T / ddim_steps - 1) and the latents noised to it;
3. the teacher, guided at a scale drawn from [guidance_min, guidance_max], takes one DDIM step
   from t_n to t_(n-1) (from t_0 to timestep 0);
4. the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) of the student at (x_tn,
   t_n) is pulled to that of the student, without gradient, at the teacher's x_t(n-1), with a
   pseudo-Huber loss.

The LoRA's up half starts at zero, so the student starts as the teacher. `--export` writes the
LoRA in diffusers/PEFT format (scale 1), which `load_pipeline(..., loras=[(file, 1.0)])` and
diffusers' `load_lora_weights` both read; it is meant for `--scheduler lcm --guidance-scale 1`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import save_file

from jaxfuse import lora, schedulers
from jaxfuse.demo import DEMO_MODEL, scenes
from jaxfuse.demo.architecture import IMAGE_SIZE
from jaxfuse.demo.train import TIME_IDS, Checkpoint, adamw, command, run_loop
from jaxfuse.pipeline import SDXLPipeline, load_pipeline
from jaxfuse.runtime.programs import CallRecord

# The UNet layers that get a LoRA (by the end of their diffusers module name), as LCM-LoRA for SDXL.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
SIGMA_DATA = 0.5  # LCM's boundary condition, as LCMScheduler


@dataclasses.dataclass(frozen=True)
class LCMConfig:
    seed: int = 0
    steps: int = 1500  # the shipped LoRA's; its prompt accuracy had levelled off by 600 (RESULTS.md)
    batch: int = 16
    lr: float = 3e-4
    warmup_steps: int = 100
    rank: int = 16
    ddim_steps: int = 50  # the teacher's grid: LCMScheduler's original_inference_steps
    guidance_min: float = 3.0  # the teacher's guidance scale is drawn from [min, max] per sample
    guidance_max: float = 7.0
    timestep_scaling: float = 10.0  # LCMScheduler's
    huber_c: float = 0.001
    checkpoint_every: int = 100
    log_every: int = 25


def lora_modules(unet_params: Any) -> dict[str, tuple[str, ...]]:
    """The UNet's modules that get a LoRA: diffusers name -> Flax kernel path."""
    return {name: path for name, path in lora.module_kernels(unet_params).items()
            if any(name == t or name.endswith("." + t) for t in TARGETS)}


def init_lora(unet_params: Any, modules: dict[str, tuple[str, ...]], rank: int, key: jax.Array) -> dict:
    """{module: {"down": [r, in(, kh, kw)], "up": [out, r(, 1, 1)]}} in PyTorch's layout (as the
    file holds them); down drawn N(0, 1/fan-in), up zeros."""
    flat = traverse_util.flatten_dict(unet_params)
    out = {}
    for i, (name, path) in enumerate(sorted(modules.items())):
        kernel = flat[path]  # [(kh, kw,) in, out]
        spatial, fan_in = kernel.shape[:-2], kernel.shape[-2]
        down = jax.random.normal(jax.random.fold_in(key, i), (rank, fan_in, *spatial)) / math.sqrt(
            fan_in * math.prod(spatial))
        out[name] = {"down": down, "up": jnp.zeros((kernel.shape[-1], rank, *(1,) * len(spatial)))}
    return out


def merged(unet_params: Any, adapters: dict, modules: dict[str, tuple[str, ...]]) -> Any:
    """The UNet's weights with every LoRA added (scale 1)."""
    flat = dict(traverse_util.flatten_dict(unet_params))
    for name, ab in adapters.items():
        flat[modules[name]] = flat[modules[name]] + lora.kernel_delta(ab["down"], ab["up"])
    return traverse_util.unflatten_dict(flat)


def boundary(t: jax.Array, scaling: float) -> tuple[jax.Array, jax.Array]:
    """LCM's (c_skip, c_out) at timesteps t [B]."""
    scaled = t * scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / jnp.sqrt(scaled**2 + SIGMA_DATA**2)


def make_step(pipe: SDXLPipeline, modules: dict, cfg: LCMConfig, tx: optax.GradientTransformation):
    """The jitted `step(state, latents, context, pooled, key) -> (state, loss)`."""
    unet, base = pipe.denoiser.unet, pipe.denoiser.params
    alphas = jnp.asarray(schedulers.train_alphas_cumprod(pipe.spec.scheduler.for_sampler(schedulers.SchedulerKind.LCM)))
    skip = alphas.shape[0] // cfg.ddim_steps

    def expand(v):  # [B] -> [B, 1, 1, 1]
        return v[:, None, None, None]

    def predict(params, x, t, context, pooled):
        """(noise, x0) predicted at x, timesteps t [B]."""
        time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (x.shape[0], 6))
        eps = unet.apply({"params": params}, x, t.astype(jnp.float32), context, text_embeds=pooled, time_ids=time_ids)
        a = expand(alphas[t])
        return eps, (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)

    def loss_fn(adapters, latents, context, pooled, key):
        b = latents.shape[0]
        k_n, k_noise, k_w = jax.random.split(key, 3)
        n = jax.random.randint(k_n, (b,), 0, cfg.ddim_steps)
        t = (n + 1) * skip - 1
        s = jnp.maximum(t - skip, 0)  # from t_0 to timestep 0, where the consistency target is x itself
        a_t, a_s = expand(alphas[t]), expand(alphas[s])
        x_t = jnp.sqrt(a_t) * latents + jnp.sqrt(1 - a_t) * jax.random.normal(k_noise, latents.shape)

        # The teacher's guided DDIM step t -> s.
        eps, x0 = predict(base, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                          jnp.concatenate([jnp.zeros_like(context), context]),
                          jnp.concatenate([jnp.zeros_like(pooled), pooled]))
        w = expand(jax.random.uniform(k_w, (b,), minval=cfg.guidance_min, maxval=cfg.guidance_max))
        (eps_u, eps_c), (x0_u, x0_c) = jnp.split(eps, 2), jnp.split(x0, 2)
        x_s = jnp.sqrt(a_s) * (x0_u + w * (x0_c - x0_u)) + jnp.sqrt(1 - a_s) * (eps_u + w * (eps_c - eps_u))
        x_s = jax.lax.stop_gradient(x_s)

        student = merged(base, adapters, modules)
        skip_t, out_t = boundary(t, cfg.timestep_scaling)
        skip_s, out_s = boundary(s, cfg.timestep_scaling)
        prediction = expand(skip_t) * x_t + expand(out_t) * predict(student, x_t, t, context, pooled)[1]
        target_x0 = predict(jax.lax.stop_gradient(student), x_s, s, context, pooled)[1]
        target = jax.lax.stop_gradient(expand(skip_s) * x_s + expand(out_s) * target_x0)
        return jnp.mean(jnp.sqrt((prediction - target) ** 2 + cfg.huber_c**2) - cfg.huber_c)

    @jax.jit
    def step(state, latents, context, pooled, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["lora"], latents, context, pooled, key)
        updates, opt = tx.update(grads, state["opt"], state["lora"])
        return {**state, "step": state["step"] + 1, "lora": optax.apply_updates(state["lora"], updates),
                "opt": opt}, loss

    return step


def batch(pipe: SDXLPipeline, seed: int, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fresh scenes as the UNet's latents (the VAE's mean, scaled) and their captions' context and
    pooled embedding."""
    images, captions = scenes.make_batch(seed, count, IMAGE_SIZE)
    run = pipe.programs.for_call(CallRecord())
    context, pooled = pipe.text.encode(run, captions)
    return pipe.codec.encode(run, images.astype(np.float32) / 255, count), context, pooled


def export_lora(adapters: dict, path: Path) -> None:
    """The LoRA as a diffusers/PEFT file: `unet.<module>.lora_A/B.weight`, float32, scale 1."""
    tensors = {}
    for name, ab in adapters.items():
        tensors[f"unet.{name}.lora_A.weight"] = np.asarray(ab["down"], np.float32)
        tensors[f"unet.{name}.lora_B.weight"] = np.asarray(ab["up"], np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial)
    partial.rename(path)


def train(cfg: LCMConfig, workdir: Path, export: Path | None, log=print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lcm_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    pipe = load_pipeline(DEMO_MODEL, cache_dir=workdir / "cache", log=log)
    modules = lora_modules(pipe.denoiser.params)
    adapters = init_lora(pipe.denoiser.params, modules, cfg.rank, jax.random.key(cfg.seed))
    log(f"LoRA of rank {cfg.rank} on {len(modules)} UNet layers: "
        f"{sum(x.size for x in jax.tree.leaves(adapters)):,} parameters")
    tx = adamw(cfg.lr, cfg.warmup_steps)
    state = {"step": 0, "seconds": 0.0, "lora": adapters, "opt": tx.init(adapters)}

    def batches(i):
        return (*batch(pipe, cfg.seed * 1_000_003 + i, cfg.batch), jax.random.key(i))

    state = run_loop("lcm", make_step(pipe, modules, cfg, tx), state, batches, cfg.steps,
                     Checkpoint(workdir / "lcm.msgpack"), cfg, log)
    if export is not None:
        export_lora(state["lora"], export)
        log(f"wrote the LoRA to {export}")
    return state


def main(argv: list[str] | None = None) -> int:
    return command(argv, "python -m jaxfuse.demo.train_lcm", __doc__, LCMConfig, train, "checkpoints",
                   "write the LoRA here (.safetensors, diffusers/PEFT format)", Path.exists)


if __name__ == "__main__":
    sys.exit(main())
