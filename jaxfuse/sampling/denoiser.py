"""What predicts the noise: the UNet today (a ControlNet beside it next), with the state it
carries from one step to the next (the stale context of displaced steps, DeepCache's features)
and the sharding of what it reads.

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
from jax.sharding import PartitionSpec as P

from jaxfuse.config import ParallelConfig
from jaxfuse.models.layers import apply_with_state
from jaxfuse.parallel.patch import CFG, STALE, zeros_like_shapes
from jaxfuse.sampling.plan import StepKind
from jaxfuse.step_cache import DEEP_CACHE


@flax.struct.dataclass
class Conditioning:
    """What the UNet reads besides the latents: [B', 77, context], [B', pooled], [B', 6]. With
    classifier-free guidance B' = 2B, the unconditional half first (diffusers' order)."""

    context: jax.Array
    text_embeds: jax.Array
    time_ids: jax.Array


@flax.struct.dataclass
class ModelState:
    """What the denoiser hands from one step to the next. Each field is None when no step of the
    run keeps it."""

    stale: Any = None  # the previous step's exchanges with the other patches (`jaxfuse.parallel.patch`)
    deep: Any = None  # DeepCache's features kept at the last full step (`jaxfuse.step_cache`): this device's rows


def initial_state(step: Callable[[], ModelState]) -> ModelState:
    """Zeros shaped like the state `step()` writes, found by tracing it abstractly
    (`jax.eval_shape`, nothing runs), so that a loop compiles one body per step kind."""
    return zeros_like_shapes(jax.eval_shape(step))


@flax.struct.dataclass
class Denoiser:
    """The UNet and its parameters as the sampling loops see them, set to one kind of step: latents,
    timesteps and conditioning in, noise out. A pytree: its parameters are what a compiled program
    takes, the module and the kind are what it is compiled for."""

    unet: Any = flax.struct.field(pytree_node=False)  # the Flax module
    params: Any
    kind: StepKind = flax.struct.field(pytree_node=False, default=StepKind())

    def of_kind(self, kind: StepKind) -> Denoiser:
        return self.replace(kind=kind)

    def apply(self, x: jax.Array, t: jax.Array, cond: Conditioning, state: ModelState) -> tuple[jax.Array, ModelState]:
        """x [B', C, h, w] at timesteps t ([] or [B']) -> (the noise prediction [B', C, h, w], the
        state for the next step: this step's exchanges when its kind writes them, `state` as given
        otherwise)."""
        kind = self.kind
        writes = [STALE] * kind.patch.writes_stale + [DEEP_CACHE] * (kind.cache is not None and kind.cache.full)
        noise, written = apply_with_state(self.unet.clone(patch=kind.patch, cache=kind.cache), self.params,
                                          {STALE: state.stale, DEEP_CACHE: state.deep}, writes, x, t, cond.context,
                                          text_embeds=cond.text_embeds, time_ids=cond.time_ids)
        return noise, state.replace(stale=written[STALE], deep=written[DEEP_CACHE])

    def init_state(self, x: jax.Array, t: jax.Array, cond: Conditioning) -> ModelState:
        """Zero state shaped as a step of this kind writes it."""
        return initial_state(lambda: self.apply(x, t, cond, ModelState())[1])

    @staticmethod
    def cond_specs(parallel: ParallelConfig) -> P:
        """How the conditioning lies on a mesh: by guidance half over `CFG` with `cfg_parallel`,
        replicated otherwise (text embeddings do not split by rows)."""
        return P(CFG) if parallel.cfg_parallel else P()
