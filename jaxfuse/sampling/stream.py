"""Stream batching (StreamDiffusion, Kodaira et al. 2023): one UNet batch holds the images in flight,
each at its own step, so every call advances all of them by one step and one finished image leaves.

    state = initial_state(config, latent_shape, seed)
    state, finished = stream_step(unet, params, config, schedule, cond, guidance, state, frame)
    program = stream_program(unet, config, schedule, mesh)   # the same, one slot per device

With `t_index_list` of n steps and f frames per call, slot s (0..n-1) holds f images at step s of
the stream's schedule (`schedulers.lcm_at`): slot 0 the frames that enter this call, slots 1..n-1
the images of the n-1 calls before. A call runs the UNet once on the n f rows, takes each row's
denoised estimate, noises it to the next slot's timestep with that slot's fixed noise (the
sampler's step with the slot's own coefficients) and moves it to the next slot
(`StreamState.latents` holds each slot's input for the next call); the last slot's estimate
leaves. An image entering at call k leaves at call k + n - 1, denoised exactly as it would be
alone with the same noise (the first n - 1 calls hand out the zeros the buffer starts with,
denoised). Image-to-image: the frame's latents noised to slot 0's level with slot 0's noise;
text-to-image: fresh noise from the state's key.

Over devices (`stream_program` on a mesh along `parallel.slots.SLOTS`) each device holds one
slot: the stream is a pipeline over denoising steps, and moving the images to the next slot is
one `ppermute` of f latents a call (and of their residual noise for `self` and `initialize`).

Residual classifier-free guidance (`RCFG`) replaces the unconditional prediction eps_u in
eps = eps_u + scale (eps_c - eps_u) by:
- `none`: no guidance, eps = eps_c (n f UNet rows);
- `self`: delta times the residual noise of each image (self-negative; n f rows);
- `initialize`: delta times the residual noise, whose slot-0 value is the unconditional prediction
  of the entering frames (onetime-negative; (n + 1) f rows);
- `full`: ordinary guidance, the unconditional prediction of every row (2 n f rows).
The residual noise of an image is the noise its latents carry relative to the clean image the
stream's estimates imply: the noise it entered with, then after each step
z_next + a_next / b_next (x0(b r, eps)), x0(., .) the sampler's estimate, a_next and b_next the
next slot's signal and noise levels and z_next its fixed noise (StreamDiffusion's update).

What the reference implementation does differently, on purpose: every shift moves a whole slot of
f rows (its `frame_buffer_size` > 1 works with one step only), the residual noise of an entering
text-to-image frame is the noise it was drawn with, and a prompt is data (`cond`), so changing it
compiles nothing for any guidance type.

Legend: n slots (len(t_index_list)), f frames per call, R = n f rows, C latent channels, h/w the
latent rows and columns.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.config import ConfigError
from jaxfuse.parallel.patch import Patch
from jaxfuse.parallel.slots import SLOT_ROWS, Slots
from jaxfuse.sampling.step import Conditioning, Guidance, Sampling, predict_noise


class RCFG(str, enum.Enum):
    NONE = "none"
    SELF = "self"
    INITIALIZE = "initialize"
    FULL = "full"

    @property
    def uses_residual(self) -> bool:
        return self in (RCFG.SELF, RCFG.INITIALIZE)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """The settings that shape the compiled stream call."""

    t_index_list: tuple[int, ...] = (32, 45)  # the steps of the schedule each image goes through
    frame_buffer_size: int = 1  # f: frames entering (and leaving) per call
    rcfg: RCFG = RCFG.SELF

    def __post_init__(self):
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        object.__setattr__(self, "rcfg", RCFG(self.rcfg))
        if self.frame_buffer_size < 1:
            raise ConfigError(f"frame_buffer_size: {self.frame_buffer_size} must be at least 1.")

    @property
    def slots(self) -> int:
        return len(self.t_index_list)

    @property
    def rows(self) -> int:
        return self.slots * self.frame_buffer_size

    def slots_here(self) -> Slots:
        """Every slot on this one device."""
        return Slots(self.slots, self.frame_buffer_size)


@flax.struct.dataclass
class StreamState:
    """What one call hands the next. Rows are slot-major, f a slot (R = n f on one device)."""

    latents: jax.Array  # [R, C, h, w] float32: each slot's input for the next call (slot 0's: unused)
    residual: jax.Array  # [R, C, h, w] float32: their residual noise (RCFG self, initialize)
    noise: jax.Array  # [R, C, h, w] float32: each slot's fixed unit noise
    next_noise: jax.Array  # [R, C, h, w] float32: the next slot's (a row's step noises it to that slot)
    key: jax.Array  # [2] uint32 key data: text-to-image input noise, folded with `calls`
    calls: jax.Array  # [] int32


@flax.struct.dataclass
class StreamGuidance:
    """Guidance as data, so a new value compiles nothing."""

    scale: jax.Array  # [] float32
    delta: jax.Array  # [] float32: the residual noise's weight as the unconditional prediction


def initial_state(config: StreamConfig, latent_shape: tuple[int, int, int], seed: int) -> StreamState:
    """An empty stream: zero latents in flight, each slot's fixed noise drawn from `seed`.
    `latent_shape`: (C, h, w)."""
    key, noise_key = jax.random.split(jax.random.key(seed))
    rows = (config.rows, *latent_shape)
    noise = jax.random.normal(noise_key, rows, jnp.float32)
    # Separate zero buffers, not one twice: a call that donates the state gives each its own.
    return StreamState(latents=jnp.zeros(rows, jnp.float32), residual=jnp.zeros(rows, jnp.float32), noise=noise,
                       next_noise=config.slots_here().from_next(noise), key=jax.random.key_data(key),
                       calls=jnp.zeros((), jnp.int32))


def state_specs() -> StreamState:
    """How a `StreamState` crosses a `shard_map` over `SLOTS`: rows by slot, the rest replicated."""
    return StreamState(SLOT_ROWS, SLOT_ROWS, SLOT_ROWS, SLOT_ROWS, P(), P())


def entering_latents(config: StreamConfig, schedule: schedulers.Schedule, state: StreamState,
                     frame: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Slot 0's latents [f, C, h, w] and the noise they carry: image-to-image, `frame`'s clean
    latents [f, C, h, w] noised to slot 0 with its fixed noise (the first f rows held: slot 0's
    where it is held); text-to-image (None), fresh noise."""
    f = config.frame_buffer_size
    if frame is None:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.calls)
        noise = jax.random.normal(key, state.noise[:f].shape, jnp.float32)
        return noise * schedule.init_noise_sigma, noise
    noise = state.noise[:f]
    return schedulers.noised_sample(schedule, frame.astype(jnp.float32), noise, 0), noise


def rows_of(cond: Conditioning, index: int, count: int) -> Conditioning:
    """Row `index` of `cond` ([1] a prompt, [2] negative then prompt) repeated `count` times."""
    return jax.tree.map(lambda v: jnp.repeat(v[index:index + 1], count, axis=0), cond)


def concat_rows(*conds: Conditioning) -> Conditioning:
    return jax.tree.map(lambda *v: jnp.concatenate(v), *conds)


def guided_noise(unet, params, config: StreamConfig, slots: Slots, schedule: schedulers.Schedule,
                 slot: jax.Array, x: jax.Array, residual: jax.Array, cond: Conditioning,
                 guidance: StreamGuidance) -> tuple[jax.Array, jax.Array]:
    """The guided noise prediction [r, C, h, w] of the rows held `x` at their slots `slot` [r],
    and the residual noise the prediction used (slot 0's replaced by the unconditional prediction
    for `initialize`). `cond`: [1] the prompt, or [2] negative prompt and prompt."""
    rcfg, f, rows = config.rcfg, config.frame_buffer_size, x.shape[0]
    cond_rows = rows_of(cond, cond.context.shape[0] - 1, rows)
    if rcfg is RCFG.FULL:
        sampling = Sampling(use_guidance=True, use_rescale=False)
        noise, _ = predict_noise(unet, params, sampling, Patch(), schedule, slot, x,
                                 concat_rows(rows_of(cond, 0, rows), cond_rows),
                                 Guidance(guidance.scale, jnp.zeros((), jnp.float32)))
        return noise, residual
    plain = Sampling(use_guidance=False, use_rescale=False)
    if rcfg is RCFG.INITIALIZE:  # the first f rows held: slot 0's where it is held (the others unused)
        both, _ = predict_noise(unet, params, plain, Patch(), schedule, jnp.concatenate([slot[:f], slot]),
                                jnp.concatenate([x[:f], x]), concat_rows(rows_of(cond, 0, f), cond_rows), None)
        negative, cond_noise = both[:f], both[f:]
        residual = slots.with_first(residual, negative)
    else:
        cond_noise, _ = predict_noise(unet, params, plain, Patch(), schedule, slot, x, cond_rows, None)
    if rcfg is RCFG.NONE:
        return cond_noise, residual
    negative = guidance.delta * residual
    return negative + guidance.scale * (cond_noise - negative), residual


def advance(unet, params, config: StreamConfig, schedule: schedulers.Schedule, cond: Conditioning,
            guidance: StreamGuidance, state: StreamState, frame: jax.Array | None,
            slots: Slots) -> tuple[StreamState, jax.Array]:
    """One call on the rows held (`slots`): the frames entering (`frame` [f, C, h, w] clean latents,
    or None for text-to-image) take slot 0, every row takes one step, and each slot's result moves
    to the next slot: (the next state, the stepped rows [r, C, h, w], whose last slot's are the
    denoised images that leave)."""
    entering, entering_noise = entering_latents(config, schedule, state, frame)
    x = slots.with_first(state.latents, entering)
    residual = slots.with_first(state.residual, entering_noise)
    slot = slots.of_rows()
    noise, residual = guided_noise(unet, params, config, slots, schedule, slot, x, residual, cond, guidance)
    # Each row moves to the next slot's timestep with that slot's noise; the last slot's "next
    # step" is the clean estimate (noise weight 0), which is the image that leaves.
    stepped, _ = schedulers.step(schedule, schedulers.init_state(schedule, x, None), slot, noise, x, state.next_noise)
    if config.rcfg.uses_residual:
        residual = slots.to_next(next_residual(schedule, slot, noise, residual, state.next_noise))
    else:
        residual = state.residual
    return state.replace(latents=slots.to_next(stepped), residual=residual, calls=state.calls + 1), stepped


def stream_step(unet, params, config: StreamConfig, schedule: schedulers.Schedule, cond: Conditioning,
                guidance: StreamGuidance, state: StreamState,
                frame: jax.Array | None = None) -> tuple[StreamState, jax.Array]:
    """One call on one device: (the next state, the f denoised latents that leave [f, C, h, w])."""
    return stream_program(unet, config, schedule, None)(params, state, cond, guidance, frame)


def stream_program(unet, config: StreamConfig, schedule: schedulers.Schedule, mesh: Mesh | None) -> Callable:
    """`stream_step` as a function of (params, state, cond, guidance, frame); on `mesh` (axis
    `SLOTS`, one device a slot), each device steps its slot and hands its images to the next."""
    slots = Slots(config.slots, config.frame_buffer_size, spread=mesh is not None)

    def run(params, state, cond, guidance, frame):
        return advance(unet, params, config, schedule, cond, guidance, state, frame, slots)

    if mesh is not None:
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(), state_specs(), P(), P(), P()),
                            out_specs=(state_specs(), SLOT_ROWS))

    def program(params, state, cond, guidance, frame):
        state, stepped = run(params, state, cond, guidance, frame)
        return state, stepped[-config.frame_buffer_size:]

    return program


def next_residual(schedule: schedulers.Schedule, slot: jax.Array, noise: jax.Array, residual: jax.Array,
                  next_noise: jax.Array) -> jax.Array:
    """The residual noise [B, C, h, w] of rows at `slot` [B] after their step (module doc): the
    next slot's fixed noise plus a_next / b_next times the estimate of the noised residual alone."""
    level = schedulers.coefficient_at(schedule.sample_from_noise, slot, residual) * residual  # b r
    drift = schedulers.predicted_x0(schedule, slot, noise, level)
    a_next, b_next = (schedulers.coefficient_at(c, slot, residual)
                      for c in (schedule.next_from_x0, schedule.next_from_noise))
    # The last slot steps to the clean image (b_next 0): its residual is not used again.
    return next_noise + jnp.where(b_next > 0, a_next / jnp.where(b_next > 0, b_next, 1.0), 0.0) * drift
