"""The tiny SDXL single-file writer (`sdxl_single_file.py`) is right: diffusers' own loader, on the
files it writes, gives every tensor of every model equal to the saved folder's, cast to the file's
dtype; and the files have the key structure real SDXL files have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file, save_file
from sdxl_single_file import (
    CLIP_PREFIX,
    HEAD_WIDTH,
    LOGIT_SCALE,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

FILE_DTYPE = torch.float16


@pytest.fixture(scope="module")
def files(tiny_single_files) -> dict[str, Path]:
    return tiny_single_files


@pytest.fixture(scope="module")
def references(files) -> dict[str, StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline]:
    """The folders' pipelines as diffusers loads them (float32)."""
    return {"base": StableDiffusionXLPipeline.from_pretrained(files["base"], local_files_only=True),
            "refiner": StableDiffusionXLImg2ImgPipeline.from_pretrained(files["refiner"], local_files_only=True)}


def differences(loaded: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Every key of `reference`'s state dict whose tensor in `loaded` is absent, not loaded (left on
    the meta device), of another shape, or not equal to the reference cast to the file's dtype."""
    ours, theirs = loaded.state_dict(), reference.state_dict()
    out = [f"unexpected: {k}" for k in ours.keys() - theirs.keys()]
    for key, want in theirs.items():
        got = ours.get(key)
        if got is None:
            out.append(f"missing: {key}")
        elif got.is_meta:
            out.append(f"not loaded: {key}")
        elif got.shape != want.shape:
            out.append(f"shape: {key} {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.equal(got, want.to(FILE_DTYPE).to(got.dtype)):
            out.append(f"value: {key} max |diff| {(got.float() - want.float()).abs().max():.3g}")
    return out


def assert_models_equal(loaded, reference, names: tuple[str, ...]) -> int:
    """Compares the models `names` of two pipelines; returns the number of tensors compared."""
    found = {name: differences(getattr(loaded, name), getattr(reference, name)) for name in names}
    assert not any(found.values()), {name: lines[:20] for name, lines in found.items() if lines}
    return sum(len(getattr(reference, name).state_dict()) for name in names)


def assert_position_ids_kept(text_encoder) -> None:
    """The position ids (a buffer, outside the state dict) are still 0..76 as int64."""
    ids = dict(text_encoder.named_buffers())["embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


def load_base(path: Path, folder: Path, **components) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32, **components)


def test_base_file_loads_as_the_folder(files, references):
    loaded = load_base(files["base_file"], files["base"])
    reference = references["base"]
    count = assert_models_equal(loaded, reference, ("unet", "vae", "text_encoder", "text_encoder_2"))
    # The file's keys: those less q/k/v weights and biases fused into 2 per OpenCLIP layer, plus
    # position_ids and logit_scale, which diffusers drops.
    assert count - 4 * 10 + 2 == len(load_file(files["base_file"])) == 1047
    assert_position_ids_kept(loaded.text_encoder)


def test_base_file_without_vae_loads_with_the_folders_vae(files, references):
    vae = AutoencoderKL.from_pretrained(files["base"] / "vae", local_files_only=True)
    loaded = load_base(files["base_file_no_vae"], files["base"], vae=vae)
    reference = references["base"]
    assert_models_equal(loaded, reference, ("unet", "text_encoder", "text_encoder_2"))
    assert loaded.vae is vae
    assert not any(k.startswith(VAE_PREFIX) for k in load_file(files["base_file_no_vae"]))


def test_refiner_file_loads_as_the_folder(files, references):
    loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(files["refiner_file"]), config=str(files["refiner"]), local_files_only=True, torch_dtype=torch.float32)
    reference = references["refiner"]
    assert_models_equal(loaded, reference, ("unet", "vae", "text_encoder_2"))
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.config.requires_aesthetics_score and not loaded.config.force_zeros_for_empty_prompt


def test_vae_file_loads_as_the_folder(files, references):
    loaded = AutoencoderKL.from_single_file(
        str(files["vae_file"]), config=str(files["base"]), subfolder="vae", local_files_only=True,
        torch_dtype=torch.float32)
    assert not differences(loaded, references["base"].vae)
    assert loaded.config.scaling_factor == 0.13025 and loaded.config.force_upcast


# Key names a real SDXL 1.0 file has that the tiny files must have too: their levels and layers per
# block are SDXL's, so the block indices agree (a downsampler in input_blocks 3 and 6; a skip
# connection where the width changes; the upsampler third in an output block with attention).
REAL_BASE_KEYS = [
    "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.2.0.emb_layers.1.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.4.1.proj_in.weight",
    "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.6.0.op.bias", "model.diffusion_model.input_blocks.7.0.skip_connection.bias",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.1.norm3.weight",
    "model.diffusion_model.middle_block.2.in_layers.2.bias",
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.0.1.proj_out.weight", "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.bias", "model.diffusion_model.output_blocks.8.0.out_layers.0.bias",
    "model.diffusion_model.out.0.weight", "model.diffusion_model.out.2.bias",
    "first_stage_model.encoder.conv_in.weight", "first_stage_model.encoder.down.0.block.1.norm2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.2.block.0.nin_shortcut.bias", "first_stage_model.encoder.mid.block_2.conv2.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.bias", "first_stage_model.decoder.up.0.block.2.conv1.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.decoder.norm_out.bias",
    "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.bias",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.bias",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.token_embedding.weight", "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.9.attn.out_proj.bias",
    "conditioner.embedders.1.model.transformer.resblocks.9.ln_2.weight",
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_fc.weight",
    "conditioner.embedders.1.model.ln_final.bias", "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.logit_scale",
]
# The refiner's UNet has four levels: no attention in the first and last, a downsampler in input
# blocks 3, 6 and 9, no skip connection in input block 10 (equal widths), the first upsampler second.
REAL_REFINER_KEYS = [
    "model.diffusion_model.input_blocks.9.0.op.weight", "model.diffusion_model.input_blocks.11.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn1.to_out.0.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.bias",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
    "conditioner.embedders.0.model.text_projection", "conditioner.embedders.0.model.logit_scale",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
]
NOT_IN_REAL_FILES = [
    "model.diffusion_model.input_blocks.12.0.op.weight",
    "model.diffusion_model.input_blocks.10.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.conv.weight",
]


def check_dtypes(state: dict[str, torch.Tensor]) -> None:
    want = {k: torch.int64 if k.endswith("position_ids") else FILE_DTYPE for k in state}
    wrong = {k: v.dtype for k, v in state.items() if v.dtype != want[k]}
    assert not wrong, wrong


def test_base_file_has_the_keys_of_real_files(files):
    state = load_file(files["base_file"])
    assert infer_diffusers_model_type(state) == "xl_base"
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX + "text_model.", OPEN_CLIP_PREFIX["base"])
    assert all(k.startswith(prefixes) for k in state), [k for k in state if not k.startswith(prefixes)]
    assert [k for k in REAL_BASE_KEYS if k not in state] == []
    check_dtypes(state)
    open_clip = OPEN_CLIP_PREFIX["base"]
    assert state[open_clip + "logit_scale"].shape == () and state[open_clip + "logit_scale"].item() == pytest.approx(
        LOGIT_SCALE, rel=1e-3)
    assert state[open_clip + "text_projection"].shape == (128, 64)  # [width, projection]
    assert state[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 128, 128)
    assert state[CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"].shape == (49408, 64)
    assert torch.equal(state[CLIP_PREFIX + "text_model.embeddings.position_ids"], torch.arange(77)[None])
    for key in ("encoder.mid.attn_1.k.weight", "decoder.mid.attn_1.proj_out.weight"):
        assert state[VAE_PREFIX + key].shape == (128, 128, 1, 1)
    assert state[UNET_PREFIX + "input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projection, as SDXL


def test_refiner_and_vae_files_have_the_keys_of_real_files(files):
    state = load_file(files["refiner_file"])
    assert infer_diffusers_model_type(state) == "xl_refiner"
    prefixes = (UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX["refiner"])
    assert all(k.startswith(prefixes) for k in state), [k for k in state if not k.startswith(prefixes)]
    assert [k for k in REAL_REFINER_KEYS if k not in state] == []
    assert [k for k in NOT_IN_REAL_FILES if k in state] == []
    check_dtypes(state)
    vae = load_file(files["vae_file"])
    assert set(vae) == {k.removeprefix(VAE_PREFIX) for k in load_file(files["base_file"]) if k.startswith(VAE_PREFIX)}
    check_dtypes(vae)


def test_tiny_models_keep_sdxl_fixed_values(files, references):
    base, refiner = references["base"], references["refiner"]
    for unet in (base.unet, refiner.unet):
        c = unet.config
        assert list(c.attention_head_dim) == [w // HEAD_WIDTH for w in c.block_out_channels]
        assert c.norm_num_groups == 32 and c.use_linear_projection and c.addition_embed_type == "text_time"
    assert base.unet.config.cross_attention_dim == 64 + 128 and refiner.unet.config.cross_attention_dim == 128
    assert base.unet.config.projection_class_embeddings_input_dim == 64 + 6 * 8
    assert refiner.unet.config.projection_class_embeddings_input_dim == 64 + 5 * 8
    assert refiner.unet.config.upcast_attention
    for vae in (base.vae, refiner.vae):
        assert vae.config.norm_num_groups == 32 and len(vae.config.block_out_channels) == 4
    assert {**base.vae.config, "_name_or_path": ""} == {**refiner.vae.config, "_name_or_path": ""}
    encoders = ((base.text_encoder, "quick_gelu"), (base.text_encoder_2, "gelu"), (refiner.text_encoder_2, "gelu"))
    for encoder, act in encoders:
        c = encoder.config
        assert (c.vocab_size, c.hidden_size // c.num_attention_heads, c.hidden_act) == (49408, HEAD_WIDTH, act)
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.max_position_embeddings) == (0, 2, 1, 77)
    for folder in (files["base"] / "tokenizer", files["base"] / "tokenizer_2", files["refiner"] / "tokenizer_2"):
        assert {p.name for p in folder.iterdir()} == {"merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                                      "vocab.json"}


def test_a_wrong_file_is_caught(files, references, tmp_path):
    """The comparison can fail: q and k of one OpenCLIP layer swapped, one UNet tensor changed."""
    state = load_file(files["base_file"])
    key = OPEN_CLIP_PREFIX["base"] + "transformer.resblocks.3.attn.in_proj_weight"
    q, k, v = state[key].chunk(3)
    state[key] = torch.cat([k, q, v])
    state[UNET_PREFIX + "output_blocks.2.2.conv.bias"] += 1
    save_file(state, str(tmp_path / "wrong.safetensors"))
    loaded = load_base(tmp_path / "wrong.safetensors", files["base"])
    reference = references["base"]
    def found(name):
        return sorted(line.split(" max")[0] for line in differences(getattr(loaded, name), getattr(reference, name)))

    assert found("text_encoder_2") == ["value: text_model.encoder.layers.3.self_attn.k_proj.weight",
                                       "value: text_model.encoder.layers.3.self_attn.q_proj.weight"]
    assert found("unet") == ["value: up_blocks.0.upsamplers.0.conv.bias"]
    assert found("text_encoder") == found("vae") == []
