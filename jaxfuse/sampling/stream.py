"""Stream batching (StreamDiffusion, Kodaira et al. 2023): one UNet batch holds the images in flight,
each at its own step, so every call advances all of them by one step and one finished image leaves.

    state = initial_state(config, latent_shape, seed)
    state, finished = stream_step(denoiser, config, schedule, cond, guidance, state, frame)
    program = stream_program(config, schedule, mesh)   # (denoiser, state, cond, guidance, frame), one slot a device

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

Over devices, two ways (`stream_program` on a mesh, the state laid out on it by `on_mesh`):
- along `parallel.slots.SLOTS` each device holds one slot: the stream is a pipeline over
  denoising steps, and moving the images to the next slot is one `ppermute` of f latents a call
  (and of their residual noise for `self` and `initialize`);
- along `parallel.patch.PATCH` every image is split by rows, as the image loop splits one
  (`ParallelConfig.mode`). In displaced (and pcpp) mode the state carries each row's stale
  context, and it moves with its image to the next slot (`stale_sources`), so every image sees the
  other patches as they were at its own previous step. An entering image has none yet
  (`FirstStep`): its first step gets a synchronous exchange of its own (a second UNet call on
  the f entering rows, recording their context), or reads what the previous entering frame left.

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
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfuse import schedulers
from jaxfuse.config import ConfigError, Mode, ParallelConfig
from jaxfuse.parallel.mesh import ROWS
from jaxfuse.parallel.patch import PATCH, Patch, own_rows, vary_like
from jaxfuse.parallel.slots import SLOT_ROWS, SLOTS, Slots
from jaxfuse.sampling import denoiser as denoisers
from jaxfuse.sampling.denoiser import Conditioning, Denoiser, ModelState
from jaxfuse.sampling.plan import StepKind
from jaxfuse.sampling.step import Guidance, Sampling, predict_noise


class RCFG(str, enum.Enum):
    NONE = "none"
    SELF = "self"
    INITIALIZE = "initialize"
    FULL = "full"

    @property
    def uses_residual(self) -> bool:
        return self in (RCFG.SELF, RCFG.INITIALIZE)


class FirstStep(str, enum.Enum):
    """How an entering image's first step sees the other patches of a displaced patch-parallel
    stream, where it has no stale context of its own yet."""

    SYNC = "sync"  # a synchronous step of the entering rows alone, recording their context
    PREVIOUS = "previous"  # the stale context the previous entering frame left at the same step


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """The settings that shape the compiled stream call."""

    t_index_list: tuple[int, ...] = (32, 45)  # the steps of the schedule each image goes through
    frame_buffer_size: int = 1  # f: frames entering (and leaving) per call
    rcfg: RCFG = RCFG.SELF
    first_step: FirstStep = FirstStep.SYNC  # patch-parallel displaced streams only

    def __post_init__(self):
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        object.__setattr__(self, "rcfg", RCFG(self.rcfg))
        object.__setattr__(self, "first_step", FirstStep(self.first_step))
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
    model: ModelState = ModelState()  # the denoiser's: displaced, each image's context from its previous step


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


def state_specs(mesh: Mesh, stale: bool) -> StreamState:
    """How a `StreamState` crosses a `shard_map` over `mesh`: along `SLOTS` rows by slot, along
    `PATCH` every latent by its rows and the stale context stacked; keys and counts replicated."""
    rows = SLOT_ROWS if SLOTS in mesh.axis_names else ROWS
    stacked = P(PATCH) if stale else None
    return StreamState(rows, rows, rows, rows, P(), P(), ModelState(stacked, control=stacked))


def entering_latents(config: StreamConfig, schedule: schedulers.Schedule, state: StreamState,
                     frame: jax.Array | None, split: bool = False) -> tuple[jax.Array, jax.Array]:
    """Slot 0's latents [f, C, h, w] and the noise they carry: image-to-image, `frame`'s clean
    latents [f, C, h, w] noised to slot 0 with its fixed noise (the first f rows held: slot 0's
    where it is held); text-to-image (None), fresh noise (this device's rows of the whole
    image's when the rows are `split` over patches)."""
    f = config.frame_buffer_size
    if frame is None:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.calls)
        def draw(shape):
            return jax.random.normal(key, shape, jnp.float32)

        noise = own_rows(draw, state.noise[:f].shape, axis=2) if split else draw(state.noise[:f].shape)
        return noise * schedule.init_noise_sigma, noise
    noise = state.noise[:f]
    return schedulers.noised_sample(schedule, frame.astype(jnp.float32), noise, 0), noise


def text_rows(cond: Conditioning) -> Conditioning:
    """The text part of `cond` (its control apart), whose rows are the prompts'."""
    return cond.replace(control=None)


def rows_of(cond: Conditioning, index: int, count: int) -> Conditioning:
    """Row `index` of `cond`'s text ([1] a prompt, [2] negative then prompt) repeated `count` times;
    its control as it is (the control images are the frames', every row reads them)."""
    rows = jax.tree.map(lambda v: jnp.repeat(v[index:index + 1], count, axis=0), text_rows(cond))
    return rows.replace(control=cond.control)


def concat_rows(first: Conditioning, *conds: Conditioning) -> Conditioning:
    """The text rows of `first` and `conds` one after the other, with `first`'s control."""
    rows = jax.tree.map(lambda *v: jnp.concatenate(v), *(text_rows(c) for c in (first, *conds)))
    return rows.replace(control=first.control)


def guided_noise(denoiser: Denoiser, config: StreamConfig, schedule: schedulers.Schedule, slot: jax.Array,
                 x: jax.Array, residual: jax.Array, cond: Conditioning, guidance: StreamGuidance, state: ModelState,
                 entering: Slots | None) -> tuple[jax.Array, jax.Array, ModelState]:
    """The guided noise prediction [r, C, h, w] of the rows `x` at their slots `slot` [r], the
    residual noise it used, and the denoiser's state after it (`denoiser` set to the step's kind).
    `entering`: where these rows hold the entering frames (the first f), whose residual
    `initialize` replaces by their unconditional prediction; None: they hold none. `cond`: [1] the
    prompt, or [2] negative prompt and prompt. UNet batch rows:
    `full` [unconditional r; conditional r], `initialize` [unconditional f; conditional r]."""
    rcfg, f, rows = config.rcfg, config.frame_buffer_size, x.shape[0]
    cond_rows = rows_of(cond, cond.context.shape[0] - 1, rows)
    if rcfg is RCFG.FULL:
        sampling = Sampling(use_guidance=True, use_rescale=False)
        noise, state = predict_noise(denoiser, sampling, schedule, slot, x,
                                     concat_rows(rows_of(cond, 0, rows), cond_rows),
                                     Guidance(guidance.scale, jnp.zeros((), jnp.float32)), state)
        return noise, residual, state
    plain = Sampling(use_guidance=False, use_rescale=False)
    if rcfg is RCFG.INITIALIZE and entering is not None:
        both, state = predict_noise(denoiser, plain, schedule, jnp.concatenate([slot[:f], slot]),
                                    jnp.concatenate([x[:f], x]), concat_rows(rows_of(cond, 0, f), cond_rows), None,
                                    state)
        negative, cond_noise = both[:f], both[f:]
        residual = entering.with_first(residual, negative)
    else:
        cond_noise, state = predict_noise(denoiser, plain, schedule, slot, x, cond_rows, None, state)
    if rcfg is RCFG.NONE:
        return cond_noise, residual, state
    negative = guidance.delta * residual
    return negative + guidance.scale * (cond_noise - negative), residual, state


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a call's rows are spread: `slots` (all on one device, or one slot per device), and
    `kind`, how the denoiser's layers see the other patches when every image is split by rows
    (`PATCH`)."""

    slots: Slots
    kind: StepKind = StepKind()

    @property
    def keeps_stale(self) -> bool:
        return self.kind.patch.reads_stale

    def entering_first(self, config: StreamConfig) -> bool:
        """The entering rows take a synchronous step of their own (`FirstStep.SYNC`)."""
        return self.keeps_stale and config.first_step is FirstStep.SYNC

    @property
    def recording(self) -> StepKind:
        """A synchronous step that writes its exchanges, as the displaced steps after it read them."""
        return StepKind(dataclasses.replace(self.kind.patch, mode=Mode.SYNC, record=True))

    def displaced_rows(self, config: StreamConfig) -> tuple[slice, Slots | None]:
        """The rows held that the displaced call steps, and where among them the entering frames
        are: every row (`PREVIOUS`), or those of slots 1..n-1 (`SYNC`: the entering rows step on
        their own)."""
        if self.entering_first(config):
            return slice(config.frame_buffer_size, None), None
        return slice(None), self.slots

    def predict(self, denoiser: Denoiser, config: StreamConfig, schedule: schedulers.Schedule, slot: jax.Array,
                x: jax.Array, residual: jax.Array, cond: Conditioning, guidance: StreamGuidance,
                state: ModelState) -> tuple[jax.Array, jax.Array, ModelState]:
        """`guided_noise` of every row held, and the denoiser's state each image takes to its next
        step: it moves with the image to the next slot (`stale_sources`)."""
        def run(kind, rows, state, entering):
            return guided_noise(denoiser.of_kind(kind), config, schedule, slot[rows], x[rows], residual[rows], cond,
                                guidance, state, entering)

        if not self.keeps_stale:
            return run(self.kind, slice(None), state, self.slots)
        rows, entering = self.displaced_rows(config)
        noise, residual, written = run(self.kind, rows, state, entering)
        if self.entering_first(config):
            f = config.frame_buffer_size
            first = run(self.recording, slice(0, f), ModelState(), Slots(1, f))
            noise, residual = jnp.concatenate([first[0], noise]), jnp.concatenate([first[1], residual])
            written = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first[2], written)
        return noise, residual, take_rows(written, stale_sources(config))


def stale_sources(config: StreamConfig) -> np.ndarray:
    """For each UNet batch row whose stale context a displaced call reads, the row of this call's
    written context it takes: the same image's, one slot back. `PREVIOUS`: one call on every row
    (`guided_noise`'s batch layout); the entering rows keep their own (the previous frame's at
    the same step). `SYNC`: rows of slots 1..n-1 read it, from this call's written context of the
    entering rows' synchronous call followed by the others' (their unconditional rows too for
    `full`; for `initialize`, the entering call's negative rows come first and are left)."""
    f, rows = config.frame_buffer_size, config.rows
    halves = 2 if config.rcfg is RCFG.FULL else 1
    if config.first_step is FirstStep.PREVIOUS:
        image = np.arange(rows)
        image = np.where(image < f, image, image - f)  # slot s > 0 takes slot s - 1's row
        sources = np.concatenate([image + half * rows for half in range(halves)])
        if config.rcfg is RCFG.INITIALIZE:  # the negative rows first, each keeping its own
            sources = np.concatenate([np.arange(f), sources + f])
        return sources
    entering_halves = 2 if config.rcfg in (RCFG.FULL, RCFG.INITIALIZE) else 1
    entering, rest = entering_halves * f, rows - f
    sources = []
    for half in range(halves):
        within = np.arange(rest)  # rows of slots 1..n-1 in this half
        from_entering = (entering_halves - halves + half) * f + within  # slot 1: the entering call's rows
        from_rest = entering + half * rest + within - f  # slot s > 1: slot s - 1's, of the other call
        sources.append(np.where(within < f, from_entering, from_rest))
    return np.concatenate(sources)


def take_rows(state: Any, sources: np.ndarray) -> Any:
    """Each state leaf [B, ...] (the batch leads) -> [len(sources), ...], its rows `sources`."""
    return jax.tree.map(lambda leaf: jnp.take(leaf, jnp.asarray(sources), axis=0), state)


def advance(denoiser: Denoiser, config: StreamConfig, schedule: schedulers.Schedule, cond: Conditioning,
            guidance: StreamGuidance, state: StreamState, frame: jax.Array | None,
            layout: Layout) -> tuple[StreamState, jax.Array]:
    """One call on the rows held (`layout`): the frames entering (`frame` [f, C, h, w] clean
    latents, or None for text-to-image) take slot 0, every row takes one step, and each slot's
    result moves to the next slot: (the next state, the stepped rows [r, C, h, w], whose last
    slot's are the denoised images that leave)."""
    slots = layout.slots
    entering, entering_noise = entering_latents(config, schedule, state, frame, layout.kind.patch.split)
    x = slots.with_first(state.latents, entering)
    residual = slots.with_first(state.residual, entering_noise)
    slot = slots.of_rows()
    noise, residual, model = layout.predict(denoiser, config, schedule, slot, x, residual, cond, guidance,
                                            state.model)
    # Each row moves to the next slot's timestep with that slot's noise; the last slot's "next
    # step" is the clean estimate (noise weight 0), which is the image that leaves.
    stepped, _ = schedulers.step(schedule, schedulers.init_state(schedule, x, None), slot, noise, x, state.next_noise)
    if config.rcfg.uses_residual:
        residual = slots.to_next(next_residual(schedule, slot, noise, residual, state.next_noise))
    else:
        residual = state.residual
    return state.replace(latents=slots.to_next(stepped), residual=residual, calls=state.calls + 1,
                         model=vary_like(model, state.model)), stepped


def stream_step(denoiser: Denoiser, config: StreamConfig, schedule: schedulers.Schedule, cond: Conditioning,
                guidance: StreamGuidance, state: StreamState,
                frame: jax.Array | None = None) -> tuple[StreamState, jax.Array]:
    """One call on one device: (the next state, the f denoised latents that leave [f, C, h, w])."""
    return stream_program(config, schedule, None)(denoiser, state, cond, guidance, frame)


def layout_of(config: StreamConfig, mesh: Mesh | None, parallel: ParallelConfig) -> Layout:
    """One device (no mesh), one slot per device (a `SLOTS` mesh), or every image split by rows
    (a `PATCH` mesh, the patches seeing each other as `parallel` says)."""
    if mesh is not None and SLOTS in mesh.axis_names:
        return Layout(Slots(config.slots, config.frame_buffer_size, spread=True))
    here = config.slots_here()
    if mesh is None:
        return Layout(here)
    patch = Patch.of(parallel)
    if patch.reads_stale and config.first_step is FirstStep.SYNC and config.slots == 1:
        patch = dataclasses.replace(patch, mode=Mode.SYNC)  # every step is an image's first
    return Layout(here, StepKind(patch))


def stream_program(config: StreamConfig, schedule: schedulers.Schedule, mesh: Mesh | None,
                   parallel: ParallelConfig = ParallelConfig()) -> Callable:
    """`stream_step` as a function of (denoiser, state, cond, guidance, frame); on a `SLOTS` mesh
    each device steps its slot and hands its images to the next; on a `PATCH` mesh every device
    steps its rows of every image, as `parallel.mode` says (a displaced stream's state carries
    the stale context: start it with `on_mesh`)."""
    layout = layout_of(config, mesh, parallel)

    def run(denoiser, state, cond, guidance, frame):
        return advance(denoiser, config, schedule, cond, guidance, state, frame, layout)

    def program(denoiser, state, cond, guidance, frame):
        call = run
        if mesh is not None:
            specs = state_specs(mesh, layout.keeps_stale)
            rows, frame_spec = (SLOT_ROWS, P()) if layout.slots.spread else (ROWS, ROWS)
            call = jax.shard_map(run, mesh=mesh, in_specs=(P(), specs, cond_specs(layout, cond), P(), frame_spec),
                                 out_specs=(specs, rows))
        state, stepped = call(denoiser, state, cond, guidance, frame)
        return state, stepped[-config.frame_buffer_size:]

    return program


def cond_specs(layout: Layout, cond: Conditioning) -> Any:
    """How the conditioning enters a stream program's `shard_map`: whole on each slot's device; the
    control images split by rows with the images over `PATCH`, the text replicated."""
    return P() if layout.slots.spread else Denoiser.cond_specs(ParallelConfig(), cond)


def on_mesh(denoiser: Denoiser, config: StreamConfig, schedule: schedulers.Schedule, cond: Conditioning,
            guidance: StreamGuidance, state: StreamState, mesh: Mesh, parallel: ParallelConfig) -> StreamState:
    """`state` laid out on `mesh` as the stream program's calls hand it on (so the first call
    compiles the same program as the others), with zero stale context for a displaced
    patch-parallel stream (its shapes traced abstractly)."""
    layout = layout_of(config, mesh, parallel)
    specs = state_specs(mesh, layout.keeps_stale)
    if layout.keeps_stale:
        def zeros(denoiser, state, cond, guidance):
            # What the displaced call reads is shaped as what a recording call on its rows writes.
            rows, entering = layout.displaced_rows(config)
            return denoisers.initial_state(lambda: guided_noise(
                denoiser.of_kind(layout.recording), config, schedule, layout.slots.of_rows()[rows],
                state.latents[rows], state.residual[rows], cond, guidance, ModelState(), entering)[2])

        model = jax.jit(jax.shard_map(zeros, mesh=mesh, in_specs=(P(), state_specs(mesh, False),
                                                                   cond_specs(layout, cond), P()),
                                      out_specs=specs.model))(denoiser, state, cond, guidance)
        state = state.replace(model=model)
    # The specs as the program's outputs carry them (no trailing None), which the compiled call
    # tells apart from the same layout spelled longer.
    def sharding(spec: P) -> NamedSharding:
        axes = list(spec)
        while axes and axes[-1] is None:
            axes.pop()
        return NamedSharding(mesh, P(*axes))

    shardings = jax.tree.map(sharding, specs, is_leaf=lambda x: isinstance(x, P))
    state = jax.device_put(state, shardings)
    # An empty stale leaf (a stride-2 convolution's halo below) comes out of the program replicated.
    replicated = NamedSharding(mesh, P())
    return state.replace(model=jax.tree.map(lambda x: jax.device_put(x, replicated) if x.size == 0 else x,
                                            state.model))


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
