"""`jaxfuse.single_file`: a single-file SDXL checkpoint in the original (SGM) layout, read as diffusers' models.

The original-layout files here are written from that layout itself (`sgm_unet`, `ldm_vae`, `clip_l`,
`open_clip`: module by module, names and shapes as Stability's, the autoencoder's and OpenCLIP's modules
define them), never through jaxfuse's mapping. diffusers' own converters read them back, and their output
loads strictly into diffusers' and transformers' models, which checks the writers; `MappedCheckpoint.read`
must then give exactly what the converters give, for every tensor. The SDXL-sized files are sparse: a real
header over a hole, so that reading them reads no tensor and costs no disk.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from jaxfuse import lora
from jaxfuse.config import UNetConfig, VAEConfig
from jaxfuse.demo.architecture import SDXL_SCHEDULER
from jaxfuse.models import clip, unet, vae
from jaxfuse.oracle import SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG
from jaxfuse.scheduler_config import SchedulerConfig
from jaxfuse.single_file import SCHEDULER_CONFIG, SingleFile, SingleFileError, sgm_blocks, sgm_name
from jaxfuse.text_encoder_config import TextEncoderConfig
from jaxfuse.weight_conversion import convert_checkpoint, match_checkpoint

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, OPEN_CLIP, REFINER_OPEN_CLIP = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
                                        "conditioner.embedders.0.model.")
# stabilityai/stable-diffusion-xl-base-1.0 `vae/config.json`, its architecture fields.
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
SDXL_TEXT = {"text_encoder": dict(width=768, layers=12, inner=3072, vocab=49408),
             "text_encoder_2": dict(width=1280, layers=32, inner=5120, vocab=49408, projection=1280)}
# Small SDXL-shaped models: widths in 64-wide heads, 32 norm groups; the refiner-like one has four levels,
# attention in the middle two, one transformer depth and OpenCLIP alone.
TINY_TEXT = {"text_encoder": dict(width=64, layers=2, inner=128, vocab=100),
             "text_encoder_2": dict(width=128, layers=2, inner=256, vocab=100, projection=80)}
TINY_UNET = {
    "sdxl": dict(block_out_channels=[64, 64, 128], layers_per_block=2, transformer_layers_per_block=[1, 1, 2],
                 attention_head_dim=[1, 1, 2], cross_attention_dim=64 + 128,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80 + 6 * 8, sample_size=128),
    "sdxl-refiner": dict(block_out_channels=[64, 64, 128, 128], layers_per_block=1, transformer_layers_per_block=2,
                         attention_head_dim=[1, 1, 2, 2], cross_attention_dim=128,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         use_linear_projection=True, upcast_attention=True, addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=80 + 5 * 8,
                         sample_size=128),
}
TINY_VAE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                scaling_factor=0.13025, force_upcast=True, sample_size=1024)


class Layout(dict):
    """name -> shape, written module by module in PyTorch's layouts."""

    def linear(self, name, inputs, outputs, bias=True):
        self[f"{name}.weight"] = (outputs, inputs)
        if bias:
            self[f"{name}.bias"] = (outputs,)

    def conv(self, name, inputs, outputs, kernel=3):
        self[f"{name}.weight"] = (outputs, inputs, kernel, kernel)
        self[f"{name}.bias"] = (outputs,)

    def norm(self, name, channels):
        self[f"{name}.weight"] = self[f"{name}.bias"] = (channels,)


def sgm_unet(cfg) -> Layout:
    """SGM's UNetModel (openaimodel.py) for a diffusers UNet config: ResBlock(in_layers, emb_layers,
    out_layers, skip_connection), SpatialTransformer, Downsample `op`, Upsample `conv` after the transformer."""
    widths, layers, n = cfg["block_out_channels"], cfg["layers_per_block"], len(cfg["block_out_channels"])
    depth = cfg["transformer_layers_per_block"]
    depths = [depth] * n if isinstance(depth, int) else depth
    attends = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    emb, out = 4 * widths[0], Layout()

    def resblock(name, inputs, outputs):
        out.norm(f"{name}.in_layers.0", inputs)
        out.conv(f"{name}.in_layers.2", inputs, outputs)
        out.linear(f"{name}.emb_layers.1", emb, outputs)
        out.norm(f"{name}.out_layers.0", outputs)
        out.conv(f"{name}.out_layers.3", outputs, outputs)
        if inputs != outputs:
            out.conv(f"{name}.skip_connection", inputs, outputs, 1)

    def transformer(name, c, layers):
        out.norm(f"{name}.norm", c)
        out.linear(f"{name}.proj_in", c, c)
        for d in range(layers):
            block = f"{name}.transformer_blocks.{d}"
            for attn, source in (("attn1", c), ("attn2", cfg["cross_attention_dim"])):
                out.linear(f"{block}.{attn}.to_q", c, c, bias=False)
                out.linear(f"{block}.{attn}.to_k", source, c, bias=False)
                out.linear(f"{block}.{attn}.to_v", source, c, bias=False)
                out.linear(f"{block}.{attn}.to_out.0", c, c)
            out.linear(f"{block}.ff.net.0.proj", c, 8 * c)  # GEGLU: value and gate
            out.linear(f"{block}.ff.net.2", 4 * c, c)
            for k in (1, 2, 3):
                out.norm(f"{block}.norm{k}", c)
        out.linear(f"{name}.proj_out", c, c)

    out.linear("time_embed.0", widths[0], emb)
    out.linear("time_embed.2", emb, emb)
    out.linear("label_emb.0.0", cfg["projection_class_embeddings_input_dim"], emb)
    out.linear("label_emb.0.2", emb, emb)
    out.conv("input_blocks.0.0", 4, widths[0])
    block, ch, skips = 1, widths[0], [widths[0]]
    for level, width in enumerate(widths):
        for _ in range(layers):
            resblock(f"input_blocks.{block}.0", ch, width)
            ch = width
            if attends[level]:
                transformer(f"input_blocks.{block}.1", ch, depths[level])
            skips.append(ch)
            block += 1
        if level < n - 1:
            out.conv(f"input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            block += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, depths[-1])
    resblock("middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(n)):
        for j in range(layers + 1):
            resblock(f"output_blocks.{block}.0", ch + skips.pop(), widths[level])
            ch = widths[level]
            if attends[level]:
                transformer(f"output_blocks.{block}.1", ch, depths[level])
            if level > 0 and j == layers:
                out.conv(f"output_blocks.{block}.{2 if attends[level] else 1}.conv", ch, ch)
            block += 1
    out.norm("out.0", ch)
    out.conv("out.2", ch, 4)
    return out


def ldm_vae(cfg) -> Layout:
    """The original AutoencoderKL: encoder.down.N.block.M, mid.block_1/attn_1/block_2 (q, k, v, proj_out
    1x1 convolutions), nin_shortcut, norm_out, decoder.up numbered from the bottom, quant convolutions."""
    widths, layers, z, n = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"], 4
    out = Layout()

    def resnet(name, inputs, outputs):
        out.norm(f"{name}.norm1", inputs)
        out.conv(f"{name}.conv1", inputs, outputs)
        out.norm(f"{name}.norm2", outputs)
        out.conv(f"{name}.conv2", outputs, outputs)
        if inputs != outputs:
            out.conv(f"{name}.nin_shortcut", inputs, outputs, 1)

    def mid(half, c):
        resnet(f"{half}.mid.block_1", c, c)
        out.norm(f"{half}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            out.conv(f"{half}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{half}.mid.block_2", c, c)

    out.conv("encoder.conv_in", 3, widths[0])
    ch = widths[0]
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", ch, widths[i])
            ch = widths[i]
        if i < n - 1:
            out.conv(f"encoder.down.{i}.downsample.conv", ch, ch)
    mid("encoder", ch)
    out.norm("encoder.norm_out", ch)
    out.conv("encoder.conv_out", ch, 2 * z)
    out.conv("quant_conv", 2 * z, 2 * z, 1)
    out.conv("post_quant_conv", z, z, 1)
    out.conv("decoder.conv_in", z, ch)
    mid("decoder", ch)
    for i in reversed(range(n)):
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", ch, widths[i])
            ch = widths[i]
        if i > 0:
            out.conv(f"decoder.up.{i}.upsample.conv", ch, ch)
    out.norm("decoder.norm_out", ch)
    out.conv("decoder.conv_out", ch, 3)
    return out


def clip_l(width, layers, inner, vocab) -> Layout:
    """CLIP ViT-L as SGM's FrozenCLIPEmbedder saves it: transformers' CLIPTextModel, with its position ids."""
    out = Layout({"text_model.embeddings.token_embedding.weight": (vocab, width),
                  "text_model.embeddings.position_embedding.weight": (77, width),
                  "text_model.embeddings.position_ids": (1, 77)})
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.linear(f"{layer}.self_attn.{proj}", width, width)
        out.norm(f"{layer}.layer_norm1", width)
        out.linear(f"{layer}.mlp.fc1", width, inner)
        out.linear(f"{layer}.mlp.fc2", inner, width)
        out.norm(f"{layer}.layer_norm2", width)
    out.norm("text_model.final_layer_norm", width)
    return out


def open_clip(width, layers, inner, vocab, projection) -> Layout:
    """OpenCLIP's text tower as SGM's FrozenOpenCLIPEmbedder2 saves it: fused in_proj, x @ text_projection."""
    out = Layout({"token_embedding.weight": (vocab, width), "positional_embedding": (77, width),
                  "text_projection": (width, projection), "logit_scale": ()})
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        out[f"{block}.attn.in_proj_weight"] = (3 * width, width)
        out[f"{block}.attn.in_proj_bias"] = (3 * width,)
        out.linear(f"{block}.attn.out_proj", width, width)
        out.norm(f"{block}.ln_1", width)
        out.linear(f"{block}.mlp.c_fc", width, inner)
        out.linear(f"{block}.mlp.c_proj", inner, width)
        out.norm(f"{block}.ln_2", width)
    out.norm("ln_final", width)
    return out


def prefixed(prefix, layout):
    return {prefix + key: shape for key, shape in layout.items()}


def file_layout(kind, unet_cfg, vae_cfg, text) -> dict[str, tuple]:
    """An SDXL base (`sdxl`) or refiner file's tensors and shapes, in the original layout."""
    shapes = prefixed(UNET, sgm_unet(unet_cfg)) | prefixed(VAE, ldm_vae(vae_cfg))
    if kind == "sdxl":
        return shapes | prefixed(CLIP_L, clip_l(**text["text_encoder"])) | prefixed(OPEN_CLIP,
                                                                                   open_clip(**text["text_encoder_2"]))
    return shapes | prefixed(REFINER_OPEN_CLIP, open_clip(**text["text_encoder_2"]))


def filled(shapes, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: np.arange(77, dtype=np.int64)[None] if key.endswith("position_ids")
            else rng.standard_normal(shape, dtype=np.float32) for key, shape in shapes.items()}


def write_sparse(path, shapes):
    """A float16 safetensors file with these tensors whose data is a hole: the header is real, the bytes
    read as zeros and take no disk (an SDXL-sized file without its 7 GB)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


def text_models(configs):
    """transformers' text encoders for `configs` ({component: config.json}), as from_pretrained builds them."""
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    return {c: classes[c](CLIPTextConfig.from_dict(configs[c])) for c in classes if c in configs}


def load_strictly(model, state_dict):
    """Loads every tensor into `model`, failing on any missing, unexpected or wrong-shaped one."""
    if isinstance(model, CLIPTextModel):  # transformers 5 names CLIPTextModel's tensors without `text_model.`
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)


MODULES = {"unet": (unet, UNetConfig.from_diffusers, (), ""), "vae": (vae, VAEConfig.from_diffusers, (), ""),
           "text_encoder": (clip, TextEncoderConfig.from_transformers, clip.BUFFERS, clip.PREFIX),
           "text_encoder_2": (clip, TextEncoderConfig.from_transformers, clip.BUFFERS, clip.PREFIX)}


def abstract_tree(component, config):
    module, read_config, _, _ = MODULES[component]
    return module.abstract_params(read_config(config))


@pytest.mark.parametrize("kind, published", [("sdxl", SDXL_BASE_CONFIG), ("sdxl-refiner", SDXL_REFINER_CONFIG)])
def test_sdxl_sized_file_has_the_published_configs(tmp_path, kind, published):
    """The SGM layout of the published SDXL configs, read back from its header alone: the configs equal
    the published ones and every model's tensors fill its parameter tree exactly."""
    shapes = file_layout(kind, published, SDXL_VAE, SDXL_TEXT)
    f = SingleFile.read(write_sparse(tmp_path / "sdxl.safetensors", shapes))
    assert f.kind == kind and f.shapes == shapes
    encoders = ("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder_2",)
    assert f.components() == ("unet", "vae", *encoders)
    assert {k: v for k, v in f.configs["unet"].items() if published[k] != v} == {}
    assert UNetConfig.from_diffusers(f.configs["unet"]) == UNetConfig.from_diffusers(published)
    assert VAEConfig.from_diffusers(f.configs["vae"]) == VAEConfig.sdxl()
    presets = {"text_encoder": TextEncoderConfig.clip_l(), "text_encoder_2": TextEncoderConfig.open_clip_bigg()}
    for c in encoders:
        assert TextEncoderConfig.from_transformers(f.configs[c]) == presets[c]
        assert (f.configs[c]["bos_token_id"], f.configs[c]["eos_token_id"], f.configs[c]["pad_token_id"]) == (0, 2, 1)
    for component in f.components():
        _, _, buffers, prefix = MODULES[component]
        abstract = abstract_tree(component, f.configs[component])
        match_checkpoint(f.checkpoint(component).shapes, abstract, buffers, prefix)


@pytest.fixture(scope="module", params=["sdxl", "sdxl-refiner"])
def tiny(request, tmp_path_factory):
    """(the file read, diffusers' conversions of the same tensors) for a tiny base or refiner file."""
    kind = request.param
    tensors = filled(file_layout(kind, TINY_UNET[kind], TINY_VAE, TINY_TEXT))
    path = tmp_path_factory.mktemp(kind) / "model.safetensors"
    save_file(tensors, str(path))
    state = {key: torch.from_numpy(value) for key, value in tensors.items()}
    converted = {"unet": convert_ldm_unet_checkpoint(state, TINY_UNET[kind]),
                 "vae": convert_ldm_vae_checkpoint(state, TINY_VAE)}
    text = {"text_encoder": dict(architectures=["CLIPTextModel"], hidden_act="quick_gelu"),
            "text_encoder_2": dict(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu")}
    references = {"unet": UNet2DConditionModel(**TINY_UNET[kind]), "vae": AutoencoderKL(**TINY_VAE)}
    for c, extra in text.items():
        if c == "text_encoder_2" or kind == "sdxl":
            dims = TINY_TEXT[c]
            references |= text_models({c: dict(extra, vocab_size=dims["vocab"], hidden_size=dims["width"],
                                               intermediate_size=dims["inner"], num_hidden_layers=dims["layers"],
                                               num_attention_heads=dims["width"] // 64,
                                               projection_dim=dims.get("projection", dims["width"]))})
    if kind == "sdxl":
        converted["text_encoder"] = {k: v for k, v in convert_ldm_clip_checkpoint(state).items()
                                     if not k.endswith("position_ids")}
    prefix = OPEN_CLIP if kind == "sdxl" else REFINER_OPEN_CLIP
    converted["text_encoder_2"] = convert_open_clip_checkpoint(references["text_encoder_2"], state, prefix)
    for c, model in references.items():  # the writers are right: diffusers' conversions fill each model exactly
        load_strictly(model, converted[c])
    return SingleFile.read(path), {c: {k: v.numpy() for k, v in d.items()} for c, d in converted.items()}


def test_tiny_file_reads_as_diffusers_converts_it(tiny):
    """Every tensor `MappedCheckpoint.read` gives, under every name, equals diffusers' conversion's."""
    f, converted = tiny
    assert f.components() == tuple(converted)
    for component, tensors in converted.items():
        mapped = f.checkpoint(component)
        assert mapped.shapes == {k: v.shape for k, v in tensors.items()}
        assert set(mapped.files.values()) == {f.path}
        different = [k for k, v in tensors.items() if not np.array_equal(mapped.read(k), v)]
        assert different == [], component


def test_tiny_configs_build_the_models(tiny):
    """The configs equal the tiny models' for what jaxfuse reads, diffusers and transformers build their
    models from them (each filled exactly by the conversion), and `convert_checkpoint` fills jaxfuse's."""
    f, converted = tiny
    assert UNetConfig.from_diffusers(f.configs["unet"]) == UNetConfig.from_diffusers(TINY_UNET[f.kind])
    assert VAEConfig.from_diffusers(f.configs["vae"]) == VAEConfig.from_diffusers(TINY_VAE)
    models = {"unet": UNet2DConditionModel.from_config(f.configs["unet"]),
              "vae": AutoencoderKL.from_config(f.configs["vae"])} | text_models(f.configs)
    for component, model in models.items():
        load_strictly(model, {k: torch.from_numpy(v) for k, v in converted[component].items()})
        _, _, buffers, prefix = MODULES[component]
        params = convert_checkpoint(f.checkpoint(component), abstract_tree(component, f.configs[component]),
                                    buffers, prefix)
        assert params  # every tensor landed on its parameter (convert_checkpoint fails otherwise)


def test_unet_names_are_the_lora_table_read_backwards(tiny):
    """One table: each UNet tensor's diffusers name, taken to SGM's names the way kohya LoRAs are, is its key."""
    f, _ = tiny
    sources = f.sources["unet"]
    blocks = sgm_blocks(list(sources))
    assert lora.sgm_blocks is sgm_blocks and lora.sgm_name is sgm_name
    for name, source in sources.items():
        module, _, parameter = name.rpartition(".")
        assert f"{UNET}{sgm_name(module, blocks)}.{parameter}" == source.key


def test_vae_alone_in_either_naming(tmp_path):
    """sdxl_vae.safetensors in the original names (no prefix) reads as diffusers converts it; a diffusers-named
    VAE file as it is."""
    tensors = filled(ldm_vae(TINY_VAE))
    save_file(tensors, str(tmp_path / "original.safetensors"))
    f = SingleFile.read(tmp_path / "original.safetensors")
    converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in tensors.items()}, TINY_VAE)
    mapped = f.checkpoint("vae")
    assert (f.kind, f.components(), list(f.configs)) == ("vae", ("vae",), ["vae"])
    assert all(np.array_equal(mapped.read(k), v.numpy()) for k, v in converted.items())
    assert mapped.shapes == {k: tuple(v.shape) for k, v in converted.items()}
    diffusers_named = {k: v.numpy() for k, v in AutoencoderKL(**TINY_VAE).state_dict().items()}
    save_file(diffusers_named, str(tmp_path / "diffusers.safetensors"))
    g = SingleFile.read(tmp_path / "diffusers.safetensors")
    assert g.configs == f.configs
    assert all(np.array_equal(g.checkpoint("vae").read(k), v) for k, v in diffusers_named.items())
    with pytest.raises(SingleFileError, match="a VAE alone, not a pipeline"):
        f.model_index()


def test_file_without_vae_and_ignored_tensors(tmp_path):
    """A file may leave the VAE out; position ids, logit scales, SGM's sigmas and EMA copies are skipped."""
    shapes = {k: v for k, v in file_layout("sdxl", TINY_UNET["sdxl"], TINY_VAE, TINY_TEXT).items()
              if not k.startswith(VAE)}
    extras = {"denoiser.sigmas": (1000,), "model_ema.decay": (), "model_ema.diffusion_modelout2weight": (4, 64, 3, 3)}
    f = SingleFile.read(write_sparse(tmp_path / "novae.safetensors", shapes | extras))
    assert f.components() == ("unet", "text_encoder", "text_encoder_2") and "vae" not in f.configs
    assert "text_model.embeddings.position_ids" not in f.checkpoint("text_encoder").shapes
    assert not any("logit_scale" in s.key for s in f.sources["text_encoder_2"].values())
    with pytest.raises(SingleFileError, match="holds no vae .*pass the vae separately"):
        f.checkpoint("vae")


def test_model_index_and_scheduler(tmp_path):
    base = SingleFile.read(write_sparse(tmp_path / "base.safetensors",
                                        file_layout("sdxl", TINY_UNET["sdxl"], TINY_VAE, TINY_TEXT)))
    refiner = SingleFile.read(write_sparse(tmp_path / "refiner.safetensors",
                                           file_layout("sdxl-refiner", TINY_UNET["sdxl-refiner"], TINY_VAE, TINY_TEXT)))
    index = base.model_index()
    assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == ("StableDiffusionXLPipeline", True)
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    index = refiner.model_index()
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert (index["requires_aesthetics_score"], index["force_zeros_for_empty_prompt"]) == (True, False)
    assert index["text_encoder"] == index["tokenizer"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert SCHEDULER_CONFIG == SDXL_SCHEDULER  # the demo writes the same published file
    SchedulerConfig.from_diffusers(SCHEDULER_CONFIG)
    assert EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).config.steps_offset == 1


def base_layout():
    return file_layout("sdxl", TINY_UNET["sdxl"], TINY_VAE, TINY_TEXT)


@pytest.mark.parametrize("case, shapes, message", [
    ("sd15", {f"{UNET}input_blocks.0.0.weight": (320, 4, 3, 3),
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
              f"{VAE}encoder.conv_in.weight": (128, 3, 3, 3)},
     r"is not SDXL: it holds a text encoder named cond_stage_model\.\* and a UNet without label_emb"),
    ("no CLIP-L", {k: v for k, v in base_layout().items() if not k.startswith(CLIP_L)},
     r"lacks the text encoder CLIP ViT-L \(conditioner\.embedders\.0\.transformer\.\*\)"),
    ("no OpenCLIP", {k: v for k, v in base_layout().items() if not k.startswith(OPEN_CLIP)},
     r"lacks the text encoder OpenCLIP ViT-bigG \(conditioner\.embedders\.1\.model\.\*\)"),
    ("unknown tensors", base_layout() | {"v_pred": (0,), f"{UNET}input_blocks.1.0.extra.weight": (64,)},
     r"holds tensors that an SDXL base \(or fine-tune\) file in the original layout does not:\n  unexpected: 2\n"
     r"    model\.diffusion_model\.input_blocks\.1\.0\.extra\.weight\n    v_pred\n  It is not a plain SDXL"),
    ("conditioning", base_layout() | {f"{UNET}label_emb.0.0.weight": (256, 129)},
     r"is not shaped as an SDXL base \(or fine-tune\) file: its add_embedding reads 129 values"),
    ("diffusers unet", {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
     r"(?s)is not an SDXL checkpoint: .*names found, up to the first dot: 2\n    conv_in\n    down_blocks"),
])
def test_errors_name_the_file_and_the_fix(tmp_path, case, shapes, message):
    path = write_sparse(tmp_path / "model.safetensors", shapes)
    with pytest.raises(SingleFileError, match=message) as e:
        SingleFile.read(path)
    assert str(path) in str(e.value)


def test_pickled_and_damaged_files_are_refused(tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"never unpickled")
    with pytest.raises(SingleFileError, match=r"pickled checkpoint \(\.ckpt\).*never unpickles.*save_file"):
        SingleFile.read(pickled)
    path = tmp_path / "vae.safetensors"
    save_file(filled(ldm_vae(TINY_VAE)), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SingleFileError, match=r"vae\.safetensors is not a readable safetensors file .*truncated or "
                                              r"damaged"):
        SingleFile.read(path)
    with pytest.raises(SingleFileError, match="no such file"):
        SingleFile.read(tmp_path / "missing.safetensors")
