"""Where a request's latents lie and what its denoising loop predicts with: one image
(`WholeImage`), split by rows over a mesh or whole on one device, or a canvas of fused views
(`Canvas`, the math in `sampling.tiled`), spread over device groups, its regions' masks and
MultiDiffusion's bootstrapping colours made here. The pipeline asks the request's layout
(`layout_of`) and never which of the two it is."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxfuse.parallel.mesh import make_mesh
from jaxfuse.parallel.views import views_mesh
from jaxfuse.pipeline.codec import Codec
from jaxfuse.pipeline.request import Request
from jaxfuse.pipeline.text import Text
from jaxfuse.sampling import tiled
from jaxfuse.sampling.denoiser import Conditioning, Control
from jaxfuse.sampling.image import Predictor, Runner
from jaxfuse.spec import PipelineSpec

# MultiDiffusion's bootstrapping draws its backgrounds from 20 random solid colours.
BOOTSTRAP_COLOURS = 20
BOOTSTRAP_STREAM = 1  # the colours' key, and folded into each seed's for the bootstrapping's draws


@dataclasses.dataclass(frozen=True)
class WholeImage:
    """One image: split by rows over the request's patches (and guidance halves), or on one device."""

    spec: PipelineSpec
    text: Text
    codec: Codec

    def mesh(self, request: Request) -> Mesh | None:
        return make_mesh(request.parallel) if request.parallel.split else None

    def conditioning(self, run: Runner, request: Request) -> Conditioning:
        """The prompts' conditioning, with the request's control images when this model has ControlNets."""
        cond = self.text.conditioning(run, request)
        part = request.control
        if part is None or not self.spec.controlnets:  # (a refiner finishing a controlled image has none)
            return cond
        images = tuple(jnp.asarray(np.transpose(image, (0, 3, 1, 2)), self.text.dtype) for image in part.images)
        return cond.replace(control=Control(images, jnp.asarray(part.step_scales(request.steps_run)), part.guess))

    def predictor(self, request: Request, mesh: Mesh | None) -> Predictor:
        return Predictor()

    def vae_layout(self, request: Request, mesh: Mesh | None) -> tuple[Mesh | None, int | None]:
        """The VAE runs on the image's mesh, split by rows, untiled."""
        return mesh, None


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A canvas of fused views of the native size (the request's `Tiles`), each view denoised as
    `image` denoises one image."""

    image: WholeImage

    @property
    def spec(self) -> PipelineSpec:
        return self.image.spec

    def mesh(self, request: Request) -> Mesh | None:
        """The views over `VIEWS`, each split by rows over `PATCH` when the request's layout splits."""
        parallel, tiles = request.parallel, request.tiles
        if tiles.devices == 1 and not parallel.split:
            return None
        return views_mesh(tiles.devices, patches=parallel.patches if parallel.split else 1)

    def latent_size(self, request: Request) -> tuple[int, int]:
        return request.height // self.spec.vae_factor, request.width // self.spec.vae_factor

    def tiling(self, request: Request) -> tiled.Tiling:
        tiles, f = request.tiles, self.spec.vae_factor
        window, stride = tiles.window // f, tiles.stride // f
        return tiled.Tiling((window, window), (stride, stride), tiled.Weighting(tiles.weighting))

    def predictor(self, request: Request, mesh: Mesh | None) -> Predictor:
        return tiled.views_predictor(self.tiling(request), self.latent_size(request), self.spec.vae_factor, mesh)

    def vae_layout(self, request: Request, mesh: Mesh | None) -> tuple[Mesh | None, int | None]:
        """In tiles of half the native size (`models.vae_tiled`: exact; SDXL's decode then needs 1.7
        GB a device up to 2048², where a tile of the native size needs 6.1 and the untiled decode of
        a native image 2.9: benchmarks/vae_memory.py), a tile on each device of the mesh at a time
        (of this process's devices: across processes each decodes it on its own)."""
        local = mesh if mesh is not None and jax.process_count() == 1 else None
        return local, request.tiles.window // self.spec.vae_factor // 2

    def conditioning(self, run: Runner, request: Request) -> tiled.CanvasConditioning:
        """The conditioning of a canvas's prompts (the request's, then each region's, each for
        every image) and where each applies (`tiled.Regions`)."""
        tiles, f = request.tiles, self.spec.vae_factor
        copies = 1 + len(tiles.regions)
        prompts = request.prompts + [r.prompt for r in tiles.regions for _ in range(request.batch)]
        negatives = None if request.negative_prompts is None else request.negative_prompts * copies
        cond = self.image.conditioning(run, dataclasses.replace(request, prompts=prompts, negative_prompts=negatives))
        canvas = self.latent_size(request)
        if not tiles.regions:
            return tiled.CanvasConditioning(cond, tiled.whole_canvas(canvas, self.spec.unet.in_channels))
        # Latent boxes cover every pixel of the pixel boxes: rows y0 // f .. ceil(y1 / f).
        boxes = np.asarray([(y0 // f, x0 // f, -(-y1 // f), -(-x1 // f)) for x0, y0, x1, y1 in
                            (r.box for r in tiles.regions)])
        # Each image's draws from its own seed, so that image i equals a one-image run with seed i.
        keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(seed), BOOTSTRAP_STREAM))
                          for seed in request.seeds])
        regions = tiled.Regions(jnp.asarray(tiled.region_masks(boxes, canvas)),
                                self.solid_colours(run, jax.random.key(BOOTSTRAP_STREAM)),
                                jnp.int32(round(tiles.bootstrap * request.steps_run)), keys)
        return tiled.CanvasConditioning(cond, regions)

    def solid_colours(self, run: Runner, key: jax.Array, count: int = BOOTSTRAP_COLOURS) -> jax.Array:
        """The UNet latents [count, C] of `count` random solid colours (MultiDiffusion's
        bootstrapping backgrounds): each colour's image encoded, its middle latent pixel (away
        from the borders the encoder pads)."""
        side = 8  # latent pixels
        pixels = side * self.spec.vae_factor
        colours = np.asarray(jax.random.uniform(key, (count, 1, 1, 3)))
        latents = self.image.codec.encode(run, np.broadcast_to(colours, (count, pixels, pixels, 3)), count)
        return latents[:, :, side // 2, side // 2]


def layout_of(request: Request, spec: PipelineSpec, text: Text, codec: Codec) -> WholeImage | Canvas:
    """The request's layout: a canvas of views when it has `Tiles`, one image otherwise."""
    image = WholeImage(spec, text, codec)
    return image if request.tiles is None else Canvas(image)
