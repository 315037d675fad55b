"""Prompts to what the UNet reads: tokenizing, the two CLIP encoders, negative prompts and SDXL's
micro-conditioning (`sampling.denoiser.Conditioning`)."""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfuse.pipeline.request import Request
from jaxfuse.sampling.denoiser import Conditioning
from jaxfuse.sampling.image import Runner


@dataclasses.dataclass
class TextEncoder:
    """One tokenizer with its CLIP encoder."""

    tokenizer: Any
    module: Any
    params: Any
    # A fast tokenizer sets its padding and truncation on the shared Rust tokenizer before each call:
    # two threads tokenizing at once could each encode with the other's settings (measured: ids of 5
    # tokens instead of 77 with four threads on one pipeline). Tokenizing is short; one at a time.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> [B, 77] int32 token ids, padded; a prompt longer than CLIP reads is cut, with
        a warning."""
        max_length = self.tokenizer.model_max_length
        with self.lock:
            ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_length,
                                 truncation=True, return_tensors="np").input_ids
            full = self.tokenizer(list(prompts)).input_ids
        for prompt, tokens in zip(prompts, full):
            if len(tokens) > max_length:
                print(f"warning: the prompt {prompt!r} is longer than CLIP's {max_length} tokens; "
                      "the end was cut off.", file=sys.stderr)
        return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Text:
    """SDXL's text side: its encoders, whether an absent negative prompt is zeros (the model
    folder's `force_zeros_for_empty_prompt`), the dtype the UNet reads, and whether the UNet's
    micro-conditioning ends in an aesthetic score (the refiner's) rather than the target size."""

    encoders: tuple[TextEncoder, ...]
    force_zeros_for_empty_prompt: bool
    dtype: Any
    aesthetic: bool = False

    def encode(self, run: Runner, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> context [B, 77, sum of widths] (each encoder's penultimate layer, side by
        side) and the last encoder's pooled embedding [B, pooled]."""
        contexts, pooled = [], None
        for i, encoder in enumerate(self.encoders):
            apply = encoder.module.apply
            hidden, pooled = run.run(f"text_encoder_{i}", lambda p, ids: apply({"params": p}, ids), encoder.params,
                                     encoder.token_ids(prompts))
            contexts.append(hidden)
        return jnp.concatenate(contexts, axis=-1), pooled

    def conditioning(self, run: Runner, request: Request, negative: bool | None = None) -> Conditioning:
        """Text embeddings and SDXL micro-conditioning, unconditional half first when guiding (or
        when `negative` asks for it whatever the guidance scale)."""
        context, pooled = self.encode(run, request.prompts)
        time_ids, negative_time_ids = self.time_ids(request)
        if request.use_guidance if negative is None else negative:
            if request.negative_prompts is None and self.force_zeros_for_empty_prompt:
                neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self.encode(run, request.negative_prompts or [""] * request.batch)
            context = jnp.concatenate([neg_context, context])
            pooled = jnp.concatenate([neg_pooled, pooled])
            time_ids = jnp.concatenate([negative_time_ids, time_ids])
        return Conditioning(context.astype(self.dtype), pooled.astype(self.dtype), time_ids)

    def time_ids(self, request: Request) -> tuple[jax.Array, jax.Array]:
        """The micro-conditioning [B, K] of the prompt and of the negative half: the original size,
        the crop's corner and the target size; the refiner's ends in its aesthetic score instead."""
        size = (request.height, request.width)
        common = [*(request.original_size or size), *request.crops_coords_top_left]
        if self.aesthetic:
            ends = [[request.aesthetics.score], [request.aesthetics.negative_score]]
        else:
            ends = [list(request.target_size or size)] * 2
        return tuple(jnp.broadcast_to(jnp.asarray(common + end, jnp.float32), (request.batch, len(common + end)))
                     for end in ends)
