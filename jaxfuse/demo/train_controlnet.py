"""Trains a ControlNet for the demo model, with optax, on the CPU: a prompt names the colours and
shapes, a grey control image of dark shapes on a light ground says where they go.

    python -m jaxfuse.demo.train_controlnet --workdir runs/controlnet                  # resumable
    python -m jaxfuse.demo.train_controlnet --workdir runs/controlnet --export demo-controlnet

The ControlNet is diffusers' `ControlNetModel.from_unet` of the shipped demo UNet, with a narrow
control-image embedding (EMBEDDING_CHANNELS): the UNet's time and micro-conditioning embeddings,
`conv_in`, down blocks and middle block copied; the zero 1x1 convolutions and the embedding's last
convolution zero, so that it starts by changing nothing; the rest of the embedding random. The
UNet and the text encoders stay frozen. The recipe:

1. `dataset.npz`: a fixed set of scenes, encoded once by the demo VAE (the mean, as the UNet's
   latents) with their captions' token ids; the scenes themselves are drawn again from the seed.
2. Each step, a batch of those scenes with fresh control images (`scenes.control_image`: every
   object a dark silhouette of a random grey, a third of them rough blobs of about the shape's
   extent, so that the caption decides the shape; a light background with a gradient; blur and
   noise), captioned by the scene's caption, or (35%) the caption of its objects at other random
   cells, or (25%) its caption without places (`caption_variant`), so that where the caption and
   the control disagree the control says where; and the demo UNet's loss: the latents noised by
   the demo's schedule, epsilon prediction with min-SNR weighting (as `demo.train` trained the
   UNet), 10% of captions dropped to zero conditioning (SDXL's `force_zeros_for_empty_prompt`),
   the gradient reaching only the ControlNet's weights. Timesteps are drawn with
   T2I-Adapter-SDXL's cubic bias toward noise (`timestep_power`): where the shapes go is settled
   in the noisiest steps, whose noise error is small whatever the control says. In 300 steps on
   1024 scenes this lowered the held-out error from 0.0050 to 0.0045, where uniform timesteps
   reached 0.0048. The learning rate is constant after its warm-up, so a longer run continues a
   shorter one.
3. At the end, the noise error on held-out scenes at fixed timesteps, of the UNet alone and with
   the ControlNet: what the control tells the UNet (the shipped one's, after 2000 steps, 24
   minutes on two CPU cores: 0.0050 alone, 0.0042 with it).

`--export` writes a diffusers ControlNet folder (`config.json`, `diffusion_pytorch_model.safetensors`
in float16), which `models.controlnet.load_controlnet` and diffusers' `ControlNetModel` read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxfuse import schedulers
from jaxfuse.checkpoint import CONFIG_NAME
from jaxfuse.config import ControlNetConfig, UNetConfig
from jaxfuse.demo import DEMO_MODEL, architecture, scenes
from jaxfuse.demo.architecture import IMAGE_SIZE
from jaxfuse.demo.train import TIME_IDS, Checkpoint, adamw, command, optimizer_step, run_loop
from jaxfuse.models.controlnet import ControlNetModel, abstract_params
from jaxfuse.pipeline import SDXLPipeline, load_pipeline
from jaxfuse.runtime.programs import CallRecord
from jaxfuse.weight_conversion import WEIGHTS_NAME, export_checkpoint

# The control image's embedding, 256 -> 32 pixels (55k parameters; SDXL's is (16, 32, 96, 256)). With the down
# blocks and middle block it copies, the ControlNet has 1.6M parameters: 3.2 MB in float16.
EMBEDDING_CHANNELS = (8, 16, 32, 64)
HELD_OUT_TIMESTEPS = (99, 299, 499, 699, 899, 999)


@dataclasses.dataclass(frozen=True)
class ControlNetTrainConfig:
    seed: int = 0
    steps: int = 2000  # 0.65 s a step alone on 2 CPU cores, 1.7 beside a test run: 22 to 57 minutes
    batch: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    dataset_size: int = 8192
    uncond_fraction: float = 0.1
    # Captions whose places disagree with the control (each object at another random cell) and captions
    # without places: the control, not the caption, says where (the scene and its control stay as drawn).
    moved_fraction: float = 0.35
    placeless_fraction: float = 0.25
    min_snr_gamma: float = 5.0
    timestep_power: float = 3.0  # timesteps T (1 - u^power), u uniform: 1 uniform, 3 biased toward noise
    held_out: int = 64  # scenes for the final comparison, each at every HELD_OUT_TIMESTEPS
    checkpoint_every: int = 100
    log_every: int = 25


def controlnet_config(unet: UNetConfig) -> ControlNetConfig:
    return ControlNetConfig(unet, embedding_channels=EMBEDDING_CHANNELS)


def zero_at_start(path: tuple[str, ...]) -> bool:
    """Whether a ControlNet parameter starts at zero: the 1x1 convolutions to the UNet and the
    control embedding's last convolution (diffusers' `zero_module`s)."""
    return path[0].startswith("controlnet_down_blocks_") or path[0] == "controlnet_mid_block" or \
        path[:2] == ("controlnet_cond_embedding", "conv_out")


def init_controlnet(cfg: ControlNetConfig, unet_params: Any, seed: int) -> dict:
    """A ControlNet's parameters as diffusers' `ControlNetModel.from_unet` makes them: the modules
    it shares with the UNet (`time_embedding`, `add_embedding`, `conv_in`, `down_blocks_*`,
    `mid_block`) copied, the zero convolutions zero, the rest of the control embedding random:
    kernels normal with variance 1/fan-in, biases zero (Flax's default start). PyTorch's start
    (kernels and biases uniform in +-1/sqrt(fan-in)), diffusers', learned more slowly here: a
    held-out error of 0.00478 after 500 steps, against 0.00461 after 300."""
    rng = np.random.default_rng(seed)

    def start(path, leaf):
        if zero_at_start(path):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if path[0] == "controlnet_cond_embedding":
            if path[-1] == "bias":
                return jnp.zeros(leaf.shape, leaf.dtype)
            return jnp.asarray(rng.normal(0, 1 / math.sqrt(math.prod(leaf.shape[:-1])), leaf.shape), leaf.dtype)
        copied = unet_params
        for name in path:
            if name not in copied:
                raise ValueError(f"{'.'.join(path)}: the UNet has no such parameter")
            copied = copied[name]
        if copied.shape != leaf.shape:
            raise ValueError(f"{'.'.join(path)}: the UNet's is {copied.shape}, the ControlNet's {leaf.shape}")
        # Through the host: an array the jitted step may place, as it does the rest of the state (the
        # pipeline's, committed to a device, would make the first two steps compile one program each).
        return jnp.asarray(np.asarray(copied), leaf.dtype)

    return jax.tree_util.tree_map_with_path(lambda p, leaf: start(tuple(k.key for k in p), leaf),
                                            abstract_params(cfg))


# --- data -------------------------------------------------------------------------------------

CHUNK = 64


def dataset_scenes(seed: int, count: int) -> list[scenes.Scene]:
    """The training scenes, drawn CHUNK at a time from seeds of their own (as `scenes.make_batch`)."""
    out = []
    for i in range(-(-count // CHUNK)):
        rng = np.random.default_rng(seed * 1_000_003 + 30_000_000 + i)
        out += [scenes.sample_scene(rng) for _ in range(CHUNK)]
    return out[:count]


def held_out_scenes(seed: int, count: int) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed * 1_000_003 + 40_000_000)
    return [scenes.sample_scene(rng) for _ in range(count)]


def encode(pipe: SDXLPipeline, scene_list: Sequence[scenes.Scene]) -> dict[str, np.ndarray]:
    """{latents [N, 4, h, w] float32 (the UNet's: the VAE's mean, scaled), ids_1, ids_2 [N, 77] int32}."""
    run = pipe.programs.for_call(CallRecord())
    latents = []
    for start in range(0, len(scene_list), CHUNK):
        chunk = scene_list[start:start + CHUNK]
        images = np.stack([scenes.render(scene, IMAGE_SIZE) for scene in chunk]).astype(np.float32) / 255
        latents.append(np.asarray(pipe.codec.encode(run, images, len(chunk))))
    captions = [scenes.caption(scene) for scene in scene_list]
    ids = [encoder.token_ids(captions) for encoder in pipe.text.encoders]
    return {"latents": np.concatenate(latents), "ids_1": ids[0], "ids_2": ids[1]}


def encoded_dataset(pipe: SDXLPipeline, cfg: ControlNetTrainConfig, workdir: Path, log) -> dict[str, np.ndarray]:
    """`encode` of the training scenes, kept in `workdir/dataset.npz`."""
    path = workdir / "dataset.npz"
    if path.is_file():
        return dict(np.load(path))
    start = time.perf_counter()
    data = encode(pipe, dataset_scenes(cfg.seed, cfg.dataset_size))
    np.savez(path, **data)
    log(f"dataset: {cfg.dataset_size} scenes encoded in {time.perf_counter() - start:.0f} s")
    return data


def control_batch(scene_list: Sequence[scenes.Scene], seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A fresh control image of each scene, in a random style from `seed`: [B, 3, size, size] float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = [scenes.control_image(s, size, scenes.sample_control_style(rng, len(s.objects))) for s in scene_list]
    return np.stack(images).transpose(0, 3, 1, 2)


# --- the loss -----------------------------------------------------------------------------------

def caption_variant(scene: scenes.Scene, rng: np.random.Generator, cfg: ControlNetTrainConfig) -> str:
    """The scene's caption, or (`moved_fraction`) the caption of its objects at other random cells, or
    (`placeless_fraction`) its caption without places."""
    u = rng.uniform()
    if u < cfg.placeless_fraction:
        return scenes.caption_without_places(scene)
    if u < cfg.placeless_fraction + cfg.moved_fraction:
        cells = rng.choice(len(scenes.POSITIONS), len(scene.objects), replace=False)
        return scenes.caption(scenes.moved_to(scene, [scenes.POSITIONS[c] for c in cells]))
    return scenes.caption(scene)


def text_conditioning(pipe: SDXLPipeline, ids_1: jax.Array, ids_2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (context [B, 77, context], pooled [B, pooled]) as the pipeline computes them."""
    (hidden_1, _), (hidden_2, pooled) = (e.module.apply({"params": e.params}, ids)
                                         for e, ids in zip(pipe.text.encoders, (ids_1, ids_2)))
    return jnp.concatenate([hidden_1, hidden_2], axis=-1), pooled


def demo_alphas_bar() -> jax.Array:
    """[T] the cumulative alphas of the demo's training schedule (SDXL's), as `demo.train` noised."""
    return jnp.asarray(schedulers.train_alphas_cumprod(schedulers.SchedulerConfig.from_diffusers(
        architecture.SDXL_SCHEDULER)))


def noise_error(pipe: SDXLPipeline, net: ControlNetModel, params: Any | None, latents, context, pooled, control,
                t, noise) -> jax.Array:
    """The UNet's squared noise error per sample [B] at timesteps t [B], with the ControlNet's
    residuals (or without, when `params` is None)."""
    ab = demo_alphas_bar()[t][:, None, None, None]
    noisy = jnp.sqrt(ab) * latents + jnp.sqrt(1 - ab) * noise
    t = t.astype(jnp.float32)
    time_ids = jnp.broadcast_to(jnp.asarray(TIME_IDS, jnp.float32), (latents.shape[0], len(TIME_IDS)))
    residuals = None if params is None else net.apply(
        {"params": params}, noisy, t, context, control, text_embeds=pooled, time_ids=time_ids)
    predicted = pipe.denoiser.unet.apply({"params": pipe.denoiser.params}, noisy, t, context, text_embeds=pooled,
                                         time_ids=time_ids, control=residuals)
    return jnp.mean((predicted - noise) ** 2, axis=(1, 2, 3))


def make_loss(pipe: SDXLPipeline, net: ControlNetModel, cfg: ControlNetTrainConfig):
    """`loss(params, latents, context, pooled, control, key)`: the min-SNR-weighted noise error of
    the frozen UNet with the ControlNet `params`, at timesteps biased toward noise, some captions
    dropped."""
    alphas_bar = demo_alphas_bar()

    def loss(params, latents, context, pooled, control, key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        b = latents.shape[0]
        keep = (jax.random.uniform(k_drop, (b,)) >= cfg.uncond_fraction).astype(jnp.float32)
        context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        u = jax.random.uniform(k_t, (b,))
        t = jnp.minimum(((1 - u**cfg.timestep_power) * alphas_bar.shape[0]).astype(jnp.int32), alphas_bar.shape[0] - 1)
        error = noise_error(pipe, net, params, latents, context, pooled, control, t,
                            jax.random.normal(k_noise, latents.shape))
        snr = alphas_bar[t] / (1 - alphas_bar[t])
        return jnp.mean(jnp.minimum(snr, cfg.min_snr_gamma) / snr * error)  # min-SNR-gamma, as demo.train

    return loss


def held_out_errors(pipe: SDXLPipeline, net: ControlNetModel, params: Any, cfg: ControlNetTrainConfig) -> dict:
    """The mean noise error over `cfg.held_out` unseen scenes, each at every HELD_OUT_TIMESTEPS with
    fixed noise: {"unet": the UNet alone, "controlnet": with the ControlNet}."""
    scene_list = held_out_scenes(cfg.seed, cfg.held_out)
    data = encode(pipe, scene_list)
    control = jnp.asarray(control_batch(scene_list, cfg.seed + 1))
    context, pooled = text_conditioning(pipe, data["ids_1"], data["ids_2"])
    latents = jnp.asarray(data["latents"])
    noise = jax.random.normal(jax.random.key(cfg.seed + 2), latents.shape)

    @jax.jit
    def errors(params, t):
        return (noise_error(pipe, net, None, latents, context, pooled, control, t, noise).mean(),
                noise_error(pipe, net, params, latents, context, pooled, control, t, noise).mean())

    totals = np.mean([errors(params, jnp.full((cfg.held_out,), t)) for t in HELD_OUT_TIMESTEPS], axis=0)
    return {"unet": float(totals[0]), "controlnet": float(totals[1])}


# --- the diffusers folder -----------------------------------------------------------------------

def controlnet_config_json(cfg: ControlNetConfig) -> dict[str, Any]:
    """The diffusers `config.json` of `cfg`: every argument of `ControlNetModel`."""
    unet = cfg.unet
    if len(set(unet.layers_per_block)) != 1:
        raise ValueError(f"diffusers' ControlNetModel has one layers_per_block; the UNet has {unet.layers_per_block}")
    if unet.center_input_sample or unet.time_embedding_dim is not None:
        raise ValueError("diffusers' ControlNetModel has neither center_input_sample nor time_embedding_dim")
    return {
        "_class_name": "ControlNetModel",
        "in_channels": unet.in_channels,
        "conditioning_channels": cfg.conditioning_channels,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "down_block_types": list(unet.down_block_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": False,
        "block_out_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block[0],
        "downsample_padding": unet.downsample_padding,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "cross_attention_dim": unet.cross_attention_dim,
        "transformer_layers_per_block": list(unet.transformer_layers_per_block),
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "attention_head_dim": list(unet.num_attention_heads),  # diffusers' name for the head counts
        "num_attention_heads": None,
        "use_linear_projection": unet.use_linear_projection,
        "class_embed_type": None,
        "addition_embed_type": unet.addition_embed_type,
        "addition_time_embed_dim": unet.addition_time_embed_dim,
        "num_class_embeds": None,
        "upcast_attention": unet.upcast_attention,
        "resnet_time_scale_shift": "default",
        "projection_class_embeddings_input_dim": unet.projection_class_embeddings_input_dim,
        "controlnet_conditioning_channel_order": cfg.channel_order,
        "conditioning_embedding_out_channels": list(cfg.embedding_channels),
        "global_pool_conditions": cfg.global_pool_conditions,
        "addition_embed_type_num_heads": 64,
    }


def export_controlnet(folder: Path, cfg: ControlNetConfig, params: Any, dtype=np.float16) -> None:
    """Writes a diffusers ControlNet folder: `config.json` and the weights in `dtype`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(controlnet_config_json(cfg), indent=2) + "\n")
    tensors = export_checkpoint(jax.device_get(params))
    save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()},
              str(folder / f"{WEIGHTS_NAME}.safetensors"))


# --- the run ------------------------------------------------------------------------------------

def train(cfg: ControlNetTrainConfig, workdir: Path, export: Path | None, log=print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "controlnet_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    pipe = load_pipeline(DEMO_MODEL, cache_dir=workdir / "cache", log=log)
    net_cfg = controlnet_config(pipe.spec.unet)
    net = ControlNetModel(net_cfg)
    params = init_controlnet(net_cfg, pipe.denoiser.params, cfg.seed)
    log(f"controlnet: {sum(x.size for x in jax.tree.leaves(params)):,} parameters")
    data = encoded_dataset(pipe, cfg, workdir, log)
    scene_list = dataset_scenes(cfg.seed, cfg.dataset_size)
    tx = adamw(cfg.lr, cfg.warmup_steps)
    state = {"step": 0, "seconds": 0.0, "params": params, "opt": tx.init(params)}

    encode_text = jax.jit(functools.partial(text_conditioning, pipe))

    def batches(i):
        rng = np.random.default_rng(cfg.seed * 7919 + i)
        rows = rng.choice(len(scene_list), cfg.batch, replace=False)
        chosen = [scene_list[r] for r in rows]
        control = control_batch(chosen, cfg.seed * 1_000_003 + 50_000_000 + i)
        prompts = [caption_variant(scene, rng, cfg) for scene in chosen]
        ids = [encoder.token_ids(prompts) for encoder in pipe.text.encoders]
        return (jnp.asarray(data["latents"][rows]), *encode_text(*ids), jnp.asarray(control), jax.random.key(i))

    state = run_loop("controlnet", optimizer_step(make_loss(pipe, net, cfg), tx), state, batches, cfg.steps,
                     Checkpoint(workdir / "controlnet.msgpack"), cfg, log)
    errors = held_out_errors(pipe, net, state["params"], cfg)
    log(f"held-out noise error: UNet alone {errors['unet']:.4f}, with the ControlNet {errors['controlnet']:.4f}")
    if export is not None:
        export_controlnet(export, net_cfg, state["params"])
        log(f"wrote the ControlNet to {export}")
    return state


def main(argv: list[str] | None = None) -> int:
    return command(argv, "python -m jaxfuse.demo.train_controlnet", __doc__, ControlNetTrainConfig, train,
                   "checkpoints and the encoded data set", "write the ControlNet here as a diffusers folder",
                   lambda path: path.exists() and any(path.iterdir()))


if __name__ == "__main__":
    sys.exit(main())
