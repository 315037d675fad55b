"""Trains the demo model from scratch on procedural scenes, with optax, on the CPU.

    python -m jaxfuse.demo.train --workdir runs/demo            # all stages, resumable
    python -m jaxfuse.demo.train --workdir runs/demo --export jaxfuse/demo/model

Four stages, each checkpointed in `--workdir` so an interrupted run resumes where it stopped:

1. `vae`: the AutoencoderKL on crops of fresh scenes (L1 + L2 reconstruction weighted up on the
   shapes' saturated pixels, a small KL). It is convolutional, so crops teach it what whole images
   would, at a quarter of the cost.
2. `decoder`: the decoder alone, on the frozen encoder's latents: sharper shapes, same latent space.
3. `latents`: a fixed data set of scenes encoded once (the latent mean), its captions tokenized by
   both tokenizers; the VAE's `scaling_factor` is set so the latents have unit variance.
4. `unet`: the two text encoders and the UNet together, on the epsilon loss with min-SNR weighting,
   10% of captions dropped to zero conditioning (SDXL's `force_zeros_for_empty_prompt`, which
   classifier-free guidance then uses), and an exponential moving average of the weights. The
   learning rate is constant after its warm-up, so a run stopped at step n equals a run
   configured for n steps, and a longer run continues a shorter one.

`--export` writes the EMA weights as a diffusers folder in float16 (`architecture.save_pipeline`).
Everything is deterministic from `--seed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import CLIPTokenizer

from jaxfuse import schedulers
from jaxfuse.demo import architecture, scenes
from jaxfuse.demo.architecture import IMAGE_SIZE, DemoArchitecture, demo_architecture
from jaxfuse.models.clip import CLIPTextEncoder
from jaxfuse.models.unet import UNet2DConditionModel
from jaxfuse.models.vae import AutoencoderKL

TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # original size, crop, target size
VAE_CROP = IMAGE_SIZE // 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    decoder_steps: int = 600
    decoder_lr: float = 5e-4
    kl_weight: float = 1e-6
    object_weight: float = 10.0
    dataset_size: int = 24576
    unet_steps: int = 10000  # the shipped model; the learning rate is constant, so more steps continue it
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.9995
    uncond_fraction: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 200
    log_every: int = 50


def adamw(lr: float, warmup: int, decay_steps: int | None = None) -> optax.GradientTransformation:
    """AdamW with clipped gradients; the learning rate warms up linearly, then decays to a tenth
    by a cosine over `decay_steps` in all, or stays constant when `decay_steps` is None."""
    if decay_steps is None:
        schedule = optax.linear_schedule(0.0, lr, warmup)
    else:
        warmup = min(warmup, decay_steps // 2)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_value=lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


class Checkpoint:
    """One stage's training state in `path` (msgpack), written atomically."""

    def __init__(self, path: Path):
        self.path = path

    def restore(self, template: Any) -> Any:
        if not self.path.is_file():
            return template
        return flax.serialization.from_bytes(template, self.path.read_bytes())

    def save(self, state: Any) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(flax.serialization.to_bytes(jax.device_get(state)))
        partial.rename(self.path)


def run_loop(name: str, step_fn: Callable, state: dict, batches: Callable[[int], tuple], steps: int,
             checkpoint: Checkpoint, cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """Runs `step_fn(state, *batches(i)) -> (state, loss)` from the checkpointed step to `steps`.
    `state["seconds"]` counts the time spent up to each checkpoint, over every run."""
    state = checkpoint.restore(state)
    first, seconds_before = int(state["step"]), float(state["seconds"])
    if first:
        log(f"{name}: resuming at step {first}")
    start, losses = time.perf_counter(), []

    def timed(state):
        return {**state, "seconds": seconds_before + time.perf_counter() - start}

    for i in range(first, steps):
        state, loss = step_fn(state, *batches(i))
        losses.append(float(loss))
        done = i + 1
        if done % cfg.log_every == 0 or done == steps:
            rate = (done - first) / (time.perf_counter() - start)
            log(f"{name} step {done}/{steps} loss {np.mean(losses):.4f} ({rate:.2f} steps/s, "
                f"{(steps - done) / rate / 60:.1f} min left)")
            losses = []
        if done % cfg.checkpoint_every == 0:
            checkpoint.save(timed(state))
    if first < steps:
        state = timed(state)
        checkpoint.save(state)
    return state


def scene_batch(seed: int, count: int) -> tuple[np.ndarray, list[str]]:
    """Scenes as NCHW float32 in [-1, 1] and their captions."""
    images, captions = scenes.make_batch(seed, count, IMAGE_SIZE)
    return np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1, captions


def scene_crops(seed: int, count: int) -> np.ndarray:
    """A VAE_CROP-pixel square from a random place of each of `count` scenes, NCHW as `scene_batch`."""
    images, _ = scene_batch(seed, count)
    corners = np.random.default_rng(seed).integers(0, IMAGE_SIZE - VAE_CROP + 1, size=(count, 2))
    return np.stack([image[:, y:y + VAE_CROP, x:x + VAE_CROP] for image, (y, x) in zip(images, corners)])


# --- stages 1 and 2: the VAE, then its decoder alone ------------------------------------------

def reconstruction_loss(images: jax.Array, recon: jax.Array, cfg: TrainConfig) -> jax.Array:
    """L1 + L2 of NCHW images in [-1, 1]. Objects cover about a tenth of the image: weighting their
    pixels (the saturated ones) up makes colour and shape, not the background, what is learned first."""
    chroma = (images.max(axis=1) - images.min(axis=1)) / 2
    error = (recon - images) * (1 + cfg.object_weight * chroma[:, None])
    return jnp.mean(jnp.abs(error)) + jnp.mean(error**2)


def optimizer_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float | None = None):
    """A jitted `step(state, *batch) -> (state, loss)` of `tx` on `loss_fn(params, *batch)`; with
    `ema_decay`, also an exponential moving average of the parameters in `state["ema"]`."""

    @jax.jit
    def step(state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], *batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "step": state["step"] + 1, "params": params, "opt": opt}
        if ema_decay is not None:
            new["ema"] = optax.incremental_update(params, state["ema"], 1 - ema_decay)
        return new, loss

    return step


def train_vae(arch: DemoArchitecture, cfg: TrainConfig, workdir: Path, log) -> dict:
    vae = AutoencoderKL(arch.vae)
    params = vae.init(jax.random.key(cfg.seed), jnp.zeros((1, 3, VAE_CROP, VAE_CROP)))["params"]
    tx = adamw(cfg.vae_lr, cfg.warmup_steps, cfg.vae_steps)
    state = {"step": 0, "seconds": 0.0, "params": params, "opt": tx.init(params)}
    log(f"vae: {sum(x.size for x in jax.tree.leaves(params)):,} parameters")

    def loss_fn(params, images, key):
        mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.apply({"params": params}, z, method=AutoencoderKL.decode)
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar) / images.size
        return reconstruction_loss(images, recon, cfg) + cfg.kl_weight * kl

    def batches(i):
        return jnp.asarray(scene_crops(cfg.seed * 1_000_003 + i, cfg.vae_batch)), jax.random.key(i)

    return run_loop("vae", optimizer_step(loss_fn, tx), state, batches, cfg.vae_steps,
                    Checkpoint(workdir / "vae.msgpack"), cfg, log)


DECODER_PARTS = ("decoder", "post_quant_conv")


def train_decoder(arch: DemoArchitecture, vae_params, cfg: TrainConfig, workdir: Path, log) -> dict:
    """The decoder alone on the frozen encoder's latent means (as Stable Diffusion's fine-tuned
    VAE decoders): sharper shapes, the same latent space. Returns the state; its `params` are the
    whole VAE's."""
    vae = AutoencoderKL(arch.vae)
    frozen = {k: v for k, v in vae_params.items() if k not in DECODER_PARTS}
    params = {k: vae_params[k] for k in DECODER_PARTS}
    tx = adamw(cfg.decoder_lr, cfg.warmup_steps, cfg.decoder_steps)
    state = {"step": 0, "seconds": 0.0, "params": params, "opt": tx.init(params)}

    def loss_fn(params, images):
        full = {**frozen, **params}
        mean, _ = vae.apply({"params": full}, images, method=AutoencoderKL.encode)
        recon = vae.apply({"params": full}, jax.lax.stop_gradient(mean), method=AutoencoderKL.decode)
        return reconstruction_loss(images, recon, cfg)

    def batches(i):
        return (jnp.asarray(scene_crops(cfg.seed * 1_000_003 + 20_000_000 + i, cfg.vae_batch)),)

    state = run_loop("decoder", optimizer_step(loss_fn, tx), state, batches, cfg.decoder_steps,
                     Checkpoint(workdir / "decoder.msgpack"), cfg, log)
    return {**state, "params": {**frozen, **state["params"]}}


# --- stage 3: the encoded data set -------------------------------------------------------------

def tokenizers(workdir: Path) -> list[CLIPTokenizer]:
    out = []
    for name, pad in zip(("tokenizer", "tokenizer_2"), architecture.PAD_TOKENS):
        architecture.write_tokenizer(workdir / name, scenes.VOCABULARY, pad)
        out.append(CLIPTokenizer.from_pretrained(workdir / name, local_files_only=True))
    return out


def encode_dataset(arch: DemoArchitecture, vae_params, cfg: TrainConfig, workdir: Path, log) -> dict:
    """{latents [N, 4, h, w] float32 (unscaled means), ids_1, ids_2 [N, 77] int32, scaling_factor,
    seconds}; N is `dataset_size` rounded down to whole chunks of 64."""
    path = workdir / "dataset.npz"
    if path.is_file():
        return dict(np.load(path))
    vae = AutoencoderKL(arch.vae)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode)[0])
    chunk, latents, captions = 64, [], []
    start = time.perf_counter()
    for i in range(cfg.dataset_size // chunk):
        images, text = scene_batch(cfg.seed * 1_000_003 + 10_000_000 + i, chunk)
        latents.append(np.asarray(encode(vae_params, jnp.asarray(images))))
        captions += text
        if (i + 1) % 64 == 0:
            log(f"latents: {len(captions)}/{cfg.dataset_size} ({time.perf_counter() - start:.0f} s)")
    latents = np.concatenate(latents)
    ids = [tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
           for tok in tokenizers(workdir)]
    data = {"latents": latents, "ids_1": ids[0].astype(np.int32), "ids_2": ids[1].astype(np.int32),
            "scaling_factor": np.float32(1 / latents.std()), "seconds": np.float32(time.perf_counter() - start)}
    np.savez(path, **data)
    log(f"latents: std {latents.std():.3f}, mean {latents.mean():.3f}; scaling_factor {data['scaling_factor']:.4f}")
    return data


# --- stage 4: the text encoders and the UNet ---------------------------------------------------

def text_conditioning(arch: DemoArchitecture, params, ids_1, ids_2):
    """Token ids -> (context [B, 77, 128], pooled [B, 64]) as the pipeline computes them."""
    hidden_1, _ = CLIPTextEncoder(arch.text_encoders[0]).apply({"params": params["text_encoder"]}, ids_1)
    hidden_2, pooled = CLIPTextEncoder(arch.text_encoders[1]).apply({"params": params["text_encoder_2"]}, ids_2)
    return jnp.concatenate([hidden_1, hidden_2], axis=-1), pooled


def train_unet(arch: DemoArchitecture, data: dict, cfg: TrainConfig, workdir: Path, log) -> dict:
    unet = UNet2DConditionModel(arch.unet)
    key = jax.random.key(cfg.seed + 1)
    ids = jnp.zeros((1, 77), jnp.int32)
    params = {name: CLIPTextEncoder(c).init(jax.random.fold_in(key, i), ids)["params"]
              for i, (name, c) in enumerate(zip(("text_encoder", "text_encoder_2"), arch.text_encoders))}
    context, pooled = text_conditioning(arch, params, ids, ids)
    latent = jnp.zeros((1, 4, *data["latents"].shape[2:]))
    params["unet"] = unet.init(jax.random.fold_in(key, 2), latent, jnp.zeros(()), context, text_embeds=pooled,
                               time_ids=jnp.asarray([TIME_IDS], jnp.float32))["params"]
    log("unet + text encoders: " + ", ".join(f"{k} {sum(x.size for x in jax.tree.leaves(v)):,}"
                                              for k, v in params.items()) + " parameters")
    tx = adamw(cfg.unet_lr, cfg.warmup_steps)
    state = {"step": 0, "seconds": 0.0, "params": params, "ema": params, "opt": tx.init(params)}
    alphas_bar = jnp.asarray(schedulers.train_alphas_cumprod(schedulers.SchedulerConfig.from_diffusers(
        architecture.SDXL_SCHEDULER)))
    scale = jnp.float32(data["scaling_factor"])
    time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (cfg.unet_batch, 6))

    def loss_fn(params, latents, ids_1, ids_2, key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        b = latents.shape[0]
        context, pooled = text_conditioning(arch, params, ids_1, ids_2)
        keep = (jax.random.uniform(k_drop, (b,)) >= cfg.uncond_fraction).astype(jnp.float32)
        context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        t = jax.random.randint(k_t, (b,), 0, alphas_bar.shape[0])
        ab = alphas_bar[t][:, None, None, None]
        noise = jax.random.normal(k_noise, latents.shape)
        x0 = latents * scale
        noisy = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
        predicted = unet.apply({"params": params["unet"]}, noisy, t.astype(jnp.float32), context,
                               text_embeds=pooled, time_ids=time_ids)
        snr = ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0])
        weight = jnp.minimum(snr, cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        return jnp.mean(weight * jnp.mean((predicted - noise) ** 2, axis=(1, 2, 3)))

    n = data["latents"].shape[0]

    def batches(i):
        rows = np.random.default_rng(cfg.seed * 7919 + i).choice(n, cfg.unet_batch, replace=False)
        return (jnp.asarray(data["latents"][rows]), jnp.asarray(data["ids_1"][rows]),
                jnp.asarray(data["ids_2"][rows]), jax.random.key(i))

    state = run_loop("unet", optimizer_step(loss_fn, tx, cfg.ema_decay), state, batches, cfg.unet_steps,
                     Checkpoint(workdir / "unet.msgpack"), cfg, log)
    return {**state, "ema": debiased_ema(state["ema"], params, cfg.ema_decay, int(state["step"]))}


def debiased_ema(ema, initial, decay: float, steps: int):
    """The moving average without its start: after n steps from the initial weights w0 it holds
    decay^n w0 plus a (1 - decay^n) share of the trained weights; removing the first and
    rescaling leaves a true weighted mean of the trained ones (Adam's bias correction)."""
    start = decay**steps
    return jax.tree.map(lambda e, w0: (e - start * w0) / (1 - start), ema, initial)


def train(cfg: TrainConfig, workdir: Path, export: Path | None, log=print) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    arch = demo_architecture()
    vae_state = train_vae(arch, cfg, workdir, log)
    decoder_state = train_decoder(arch, vae_state["params"], cfg, workdir, log)
    data = encode_dataset(arch, vae_state["params"], cfg, workdir, log)
    arch = demo_architecture(float(data["scaling_factor"]))
    unet_state = train_unet(arch, data, cfg, workdir, log)
    seconds = {"vae": float(vae_state["seconds"]), "decoder": float(decoder_state["seconds"]),
               "latents": float(data["seconds"]),
               "unet": float(unet_state["seconds"])}
    (workdir / "train_seconds.json").write_text(json.dumps(seconds, indent=2))
    log("training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + f", total {sum(seconds.values()) / 60:.1f} min")
    if export is not None:
        architecture.save_pipeline(export, arch, {**unet_state["ema"], "vae": decoder_state["params"]})
        log(f"wrote the model to {export}")


def command(argv: list[str] | None, prog: str, doc: str, config: type, train_fn: Callable, workdir_help: str,
            export_help: str, export_in_use: Callable[[Path], bool]) -> int:
    """A trainer's command line: `--workdir`, `--export` (refused while `export_in_use`) and a flag
    per field of the frozen dataclass `config` (`--unet-steps` for unet_steps); runs
    `train_fn(config, workdir, export, log)`."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help=workdir_help)
    p.add_argument("--export", type=Path, help=export_help)
    for field in dataclasses.fields(config):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default, help=" ")
    args = p.parse_args(argv)
    if args.export is not None and export_in_use(args.export):
        print(f"error: --export {args.export} is in use; remove it or choose another path.", file=sys.stderr)
        return 2
    cfg = config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})
    train_fn(cfg, args.workdir, args.export, log=lambda line: print(line, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    return command(argv, "python -m jaxfuse.demo.train", __doc__, TrainConfig, train,
                   "checkpoints and the encoded data set", "write the trained model here as a diffusers folder",
                   lambda path: path.exists() and any(path.iterdir()))


if __name__ == "__main__":
    sys.exit(main())
