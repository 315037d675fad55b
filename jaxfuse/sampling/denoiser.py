"""What predicts the noise: the UNet, with the ControlNets beside it when the conditioning holds
control images, with the state it carries from one step to the next (the stale context of
displaced steps, DeepCache's features, each ControlNet's stale context) and the sharding of what
it reads.

    denoiser = Denoiser(unet, params).of_kind(kind)     # `kind`: the step's `plan.StepKind`
    noise, state = denoiser.apply(x, t, cond, state)
    state = denoiser.init_state(x, t, cond)             # zeros, shaped as a step of its kind writes it

The state is one typed structure (`ModelState`) in every loop: the image loop, the views of a
canvas and the stream carry it the same way.

Legend: B' the model's batch, C the latent channels, h/w this device's latent rows and columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxfuse.config import ParallelConfig
from jaxfuse.models.layers import apply_with_state
from jaxfuse.parallel.mesh import ROWS
from jaxfuse.parallel.patch import CFG, STALE, unconditional_rows, zeros_like_shapes
from jaxfuse.sampling.plan import StepKind
from jaxfuse.step_cache import DEEP_CACHE


@flax.struct.dataclass
class Control:
    """The control images of a request, one per ControlNet [B, 3, 8 h, 8 w] in [0, 1] (this device's
    rows, B the images: the guidance batch shares them), and each ControlNet's conditioning scale
    [K, steps] at each step (0 on the steps outside its start..end). `at_step` turns the scales
    into one step's per UNet row [K, B']. `guess`: diffusers' guess mode, the unconditional rows
    get no residuals."""

    images: tuple[jax.Array, ...]
    scales: jax.Array
    guess: bool = flax.struct.field(pytree_node=False, default=False)

    def at_step(self, i: jax.Array, rows: int, guided: bool, cfg_parallel: bool) -> Control:
        """This control at step i ([], or [B]: each image at its own step) for a UNet batch of
        `rows` (the images, doubled with guidance unless `cfg_parallel`): scales [K, rows]."""
        scales = self.scales[:, i]  # [K] or [K, B]
        scales = jnp.broadcast_to(scales[:, None], (len(self.images), rows)) if scales.ndim == 1 else (
            jnp.tile(scales, (1, rows // scales.shape[1])))
        if self.guess:
            scales = jnp.where(unconditional_rows(rows, guided, cfg_parallel), 0.0, scales)
        return self.replace(scales=scales)


@flax.struct.dataclass
class Conditioning:
    """What the UNet reads besides the latents: [B', 77, context], [B', pooled], [B', 6], and the
    ControlNets' control (None: no ControlNet runs). With classifier-free guidance B' = 2B, the
    unconditional half first (diffusers' order)."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array
    control: Control | None = None


@flax.struct.dataclass
class ModelState:
    """What the denoiser hands from one step to the next. Each field is None when no step of the
    run keeps it."""

    stale: Any = None  # the previous step's exchanges with the other patches (`jaxfuse.parallel.patch`)
    deep: Any = None  # DeepCache's features kept at the last full step (`jaxfuse.step_cache`): this device's rows
    control: Any = None  # each ControlNet's stale context (a tuple, one per ControlNet)


def initial_state(step: Callable[[], ModelState]) -> ModelState:
    """Zeros shaped like the state `step()` writes, found by tracing it abstractly
    (`jax.eval_shape`, nothing runs), so that a loop compiles one body per step kind."""
    return zeros_like_shapes(jax.eval_shape(step))


@flax.struct.dataclass
class ControlNet:
    """A ControlNet (`models.controlnet`) and its parameters."""

    module: Any = flax.struct.field(pytree_node=False)
    params: Any


@flax.struct.dataclass
class Denoiser:
    """The UNet and its parameters as the sampling loops see them, set to one kind of step: latents,
    timesteps and conditioning in, noise out; with the ControlNets it may run beside it. A pytree:
    its parameters are what a compiled program takes, the modules and the kind are what it is
    compiled for."""

    unet: Any = flax.struct.field(pytree_node=False)  # the Flax module
    params: Any
    kind: StepKind = flax.struct.field(pytree_node=False, default=StepKind())
    controlnets: tuple[ControlNet, ...] = ()

    def of_kind(self, kind: StepKind) -> Denoiser:
        return self.replace(kind=kind)

    def apply(self, x: jax.Array, t: jax.Array, cond: Conditioning, state: ModelState) -> tuple[jax.Array, ModelState]:
        """x [B', C, h, w] at timesteps t ([] or [B']) -> (the noise prediction [B', C, h, w], the
        state for the next step: this step's exchanges when its kind writes them, `state` as given
        otherwise)."""
        kind = self.kind
        residuals, control_state = None, state.control
        if cond.control is not None:
            residuals, control_state = self.control_residuals(x, t, cond, state.control)
        writes = [STALE] * kind.patch.writes_stale + [DEEP_CACHE] * (kind.cache is not None and kind.cache.full)
        noise, written = apply_with_state(self.unet.clone(patch=kind.patch, cache=kind.cache), self.params,
                                          {STALE: state.stale, DEEP_CACHE: state.deep}, writes, x, t, cond.context,
                                          text_embeds=cond.text_embeds, time_ids=cond.time_ids, control=residuals)
        return noise, state.replace(stale=written[STALE], deep=written[DEEP_CACHE], control=control_state)

    def control_residuals(self, x: jax.Array, t: jax.Array, cond: Conditioning, stale: Any) -> tuple[Any, Any]:
        """The sum of every ControlNet's residuals on x, each scaled per row (`cond.control` at
        this step: `Control.at_step`), and each ControlNet's stale context after the step."""
        control, patch = cond.control, self.kind.patch
        total, written = None, []
        for net, image, scale, own in zip(self.controlnets, control.images, control.scales,
                                          stale or (None,) * len(self.controlnets), strict=True):
            image = jnp.tile(image, (x.shape[0] // image.shape[0], 1, 1, 1))  # the guidance batch shares the images
            residuals, state = apply_with_state(net.module.clone(patch=patch), net.params, {STALE: own},
                                                [STALE] if patch.writes_stale else [], x, t, cond.context, image,
                                                text_embeds=cond.text_embeds, time_ids=cond.time_ids,
                                                conditioning_scale=scale, guess_mode=control.guess)
            total = residuals if total is None else jax.tree.map(jnp.add, total, residuals)
            written.append(state[STALE])
        return total, tuple(written) if patch.writes_stale else stale

    def init_state(self, x: jax.Array, t: jax.Array, cond: Conditioning) -> ModelState:
        """Zero state shaped as a step of this kind writes it."""
        return initial_state(lambda: self.apply(x, t, cond, ModelState())[1])

    @staticmethod
    def cond_specs(parallel: ParallelConfig, cond: Conditioning) -> Conditioning:
        """How the conditioning lies on a mesh: the text by guidance half over `CFG` with
        `cfg_parallel`, replicated otherwise (text embeddings do not split by rows); the control
        images by rows, as the latents (both guidance halves read them)."""
        text = P(CFG) if parallel.cfg_parallel else P()
        control = cond.control
        if control is not None:
            control = control.replace(images=(ROWS,) * len(control.images), scales=P())
        return Conditioning(text, text, text, control)
