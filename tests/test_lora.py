"""LoRA files fused at load against diffusers' `load_lora_weights` + `fuse_lora` on the tiny
pipeline: random LoRAs made here in diffusers/PEFT format (by PEFT) and in kohya format (with
diffusers' module names and with the SGM UNet's), for the UNet and both text encoders; and the
errors for files that do not fit.

diffusers loads the UNet's part. Its text-encoder path goes through transformers 5, which asks
for PEFT >= 0.22, newer than any on PyPI here (0.21.2), so the reference's text encoders get
their updates added by hand, W += weight x scale x up @ down, module by module in PyTorch.
"""

import functools
import json
import operator

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from flax import traverse_util
from lora_files import peft_file
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxfuse import lora
from jaxfuse.pipeline import load_pipeline

HEIGHT, WIDTH, STEPS = 64, 96, 4
REQUEST = dict(prompt="a red circle at the top left", negative_prompt="a blue square", guidance_scale=6.0,
               height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)


# Every test runs in its own folder: nothing lands where pytest was started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def plain(tiny_sdxl_folder, noise, tmp_path_factory):
    pipe = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)
    return pipe(**REQUEST, latents=noise)


def submodule(model, name):
    """A CLIP module by either name: transformers 5's CLIPTextModel has no `text_model.`, its
    CLIPTextModelWithProjection has."""
    short = name.removeprefix("text_model.")
    for candidate in (short, f"text_model.{short}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise AttributeError(name)


def diffusers_images(folder, path, weight, noise, text_scales):
    """diffusers' images with the file's UNet part loaded and fused by diffusers, its text-encoder
    part added by hand; `text_scales`: {text-encoder tensor name of an update's down half:
    (component, module, scale)}."""
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    tensors = load_file(path)
    with safe_open(path, "np") as f:
        metadata = f.metadata()  # PEFT's config: the UNet's alphas
    unet_part = path.with_name("unet-" + path.name)
    save_file({k: v for k, v in tensors.items() if k.startswith(("unet.", "lora_unet_"))}, unet_part, metadata)
    reference.load_lora_weights(str(path.parent), weight_name=unet_part.name)
    reference.fuse_lora(lora_scale=weight)
    with torch.no_grad():
        for down, (component, module, scale) in text_scales.items():
            up = down.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
            delta = torch.from_numpy(tensors[up]) @ torch.from_numpy(tensors[down])
            submodule(getattr(reference, component), module).weight += weight * scale * delta
    return reference(**REQUEST, latents=torch.from_numpy(noise), output_type="np").images


def ours(folder, path, weight, noise, tmp_path):
    pipe = load_pipeline(folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, weight)])
    return pipe(**REQUEST, latents=noise)


def kohya_file(path, modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], seed: int,
               alphas: dict[str, float] | None = None) -> tuple[object, dict]:
    """A kohya-format LoRA: {name: (down shape, up shape)} of random weights, each with its alpha
    from `alphas` or the file's one random alpha (diffusers 0.42.1 applies one alpha to all of a
    kohya file's modules: measured 0.02 apart from the kohya definition with alphas that differ,
    4e-6 module by module); and its text-encoder scales (see `diffusers_images`)."""
    rng = np.random.default_rng(seed)
    alpha = rng.uniform(1, 4)
    tensors, text_scales = {}, {}
    for name, (down, up) in modules.items():
        tensors[f"{name}.lora_down.weight"] = (0.3 * rng.standard_normal(down)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (0.3 * rng.standard_normal(up)).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array((alphas or {}).get(name, alpha), np.float32)  # 0-d, as kohya saves it
        if name in TEXT_ENCODERS:
            component, module = TEXT_ENCODER_MODULES[name]
            text_scales[f"{name}.lora_down.weight"] = (component, module, float(tensors[f"{name}.alpha"]) / down[0])
    save_file(tensors, path)
    return path, text_scales


# The tiny UNet: levels of 32 and 64 channels (the second with attention), one ResNet a level,
# text context 80 wide (32 + 48); the CLIP encoders 32 and 48 wide, MLPs 69 and 101.
TEXT_ENCODERS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((3, 32), (32, 3)),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ((3, 48), (101, 3)),
}
TEXT_ENCODER_MODULES = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"),
}
KOHYA_DIFFUSERS_NAMES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 64), (64, 4)),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 80), (64, 4)),
    "lora_unet_up_blocks_0_attentions_1_proj_out": ((4, 64), (64, 4)),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 32, 3, 3), (32, 4, 1, 1)),
    **TEXT_ENCODERS,
}
KOHYA_SGM_NAMES = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": ((4, 64), (64, 4)),  # down_blocks.1.attentions.0
    "lora_unet_input_blocks_1_0_in_layers_2": ((4, 32, 3, 3), (32, 4, 1, 1)),  # down_blocks.0.resnets.0.conv1
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": ((4, 80), (64, 4)),  # mid_block.attentions.0
    "lora_unet_output_blocks_1_1_proj_in": ((4, 64), (64, 4)),  # up_blocks.0.attentions.1
    **TEXT_ENCODERS,
}


def test_lora_blocks_in_sgm_names():
    """SDXL's layout (two ResNets a level, attention at levels 1 and 2): the names its LoRAs carry."""
    modules = [f"down_blocks.{i}.resnets.{j}.conv1" for i in range(3) for j in range(2)]
    modules += [f"down_blocks.{i}.attentions.{j}.proj_in" for i in (1, 2) for j in range(2)]
    modules += [f"up_blocks.{i}.resnets.{j}.conv1" for i in range(3) for j in range(3)]
    modules += [f"up_blocks.{i}.attentions.{j}.proj_in" for i in (0, 1) for j in range(3)]
    blocks = lora.sgm_blocks(modules)
    assert lora.sgm_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", blocks) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert lora.sgm_name("down_blocks.2.resnets.1.time_emb_proj", blocks) == "input_blocks.8.0.emb_layers.1"
    assert lora.sgm_name("down_blocks.1.downsamplers.0.conv", blocks) == "input_blocks.6.0.op"
    assert lora.sgm_name("mid_block.resnets.1.conv_shortcut", blocks) == "middle_block.2.skip_connection"
    assert lora.sgm_name("up_blocks.0.resnets.2.conv2", blocks) == "output_blocks.2.0.out_layers.3"
    assert lora.sgm_name("up_blocks.1.upsamplers.0.conv", blocks) == "output_blocks.5.2.conv"
    assert lora.sgm_name("up_blocks.2.resnets.0.conv1", blocks) == "output_blocks.6.0.in_layers.2"
    assert lora.sgm_name("conv_out", blocks) == "out.2"


def test_peft_format_equals_diffusers(tiny_sdxl_folder, noise, plain, tmp_path):
    path, text_scales = peft_file(tiny_sdxl_folder, tmp_path)
    ref = diffusers_images(tiny_sdxl_folder, path, 0.8, noise, text_scales)
    images = ours(tiny_sdxl_folder, path, 0.8, noise, tmp_path)
    assert np.abs(ref - plain).max() > 0.05  # the LoRA changes the image
    assert np.abs(images - ref).max() < 5e-5  # measured 4.6e-6 (PEFT), 5.2e-6 and 5.9e-6 (kohya)


@pytest.mark.parametrize("modules", [KOHYA_DIFFUSERS_NAMES, KOHYA_SGM_NAMES], ids=["diffusers-names", "sgm-names"])
def test_kohya_format_equals_diffusers(tiny_sdxl_folder, noise, plain, tmp_path, modules):
    path, text_scales = kohya_file(tmp_path / "kohya.safetensors", modules, seed=1)
    ref = diffusers_images(tiny_sdxl_folder, path, 0.7, noise, text_scales)
    images = ours(tiny_sdxl_folder, path, 0.7, noise, tmp_path)
    assert np.abs(ref - plain).max() > 0.05
    assert np.abs(images - ref).max() < 5e-5  # measured 4.6e-6 (PEFT), 5.2e-6 and 5.9e-6 (kohya)


def test_each_kohya_module_takes_its_own_alpha(tiny_sdxl_folder, tmp_path):
    """W += weight x alpha / r x up @ down, per module, in Flax's layout (a dense kernel [in, out],
    a convolution's [kh, kw, in, out])."""
    modules = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
            (1.5, ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")),
        "lora_unet_down_blocks_0_resnets_0_conv1": (3.0, ("down_blocks_0", "resnets_0", "conv1", "kernel")),
    }
    path, _ = kohya_file(tmp_path / "k.safetensors", {k: KOHYA_DIFFUSERS_NAMES[k] for k in modules}, seed=5,
                         alphas={k: alpha for k, (alpha, _) in modules.items()})
    base = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None).denoiser.params
    fused = load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None,
                          loras=[(path, 0.5)]).denoiser.params
    tensors = load_file(path)
    for name, (alpha, kernel) in modules.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]  # rank 4
        delta = (up.reshape(up.shape[0], 4) @ down.reshape(4, -1)).reshape(up.shape[0], *down.shape[1:])
        delta = delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)
        change = np.asarray(functools.reduce(operator.getitem, kernel, fused)) - np.asarray(
            functools.reduce(operator.getitem, kernel, base))
        np.testing.assert_allclose(change, 0.5 * alpha / 4 * delta, atol=1e-6)


def kernels(pipe) -> dict:
    return {c: traverse_util.flatten_dict(tree) for c, tree in
            (("unet", pipe.denoiser.params), ("text_encoder", pipe.text.encoders[0].params),
             ("text_encoder_2", pipe.text.encoders[1].params))}


def test_two_loras_add_up_and_the_cache_keeps_the_weights_without_them(tiny_sdxl_folder, tmp_path):
    """Two files fused at once change exactly the kernels each names; a later plain load from the
    same cache gives the model's own weights."""
    first, _ = kohya_file(tmp_path / "a.safetensors", {k: v for k, v in KOHYA_DIFFUSERS_NAMES.items()
                                                        if k not in TEXT_ENCODERS}, seed=2)
    second, _ = kohya_file(tmp_path / "b.safetensors", TEXT_ENCODERS, seed=3)
    plain = kernels(load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None))
    both = kernels(load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None,
                                 loras=[(first, 0.5), (second, 1.5)]))
    again = kernels(load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None))
    changed = {(c, path) for c in plain for path in plain[c] if not np.array_equal(plain[c][path], both[c][path])}
    assert len(changed) == len(KOHYA_DIFFUSERS_NAMES)  # one kernel per module of the two files
    assert {c for c, _ in changed} == {"unet", "text_encoder", "text_encoder_2"}
    for c in plain:
        for path in plain[c]:
            np.testing.assert_array_equal(again[c][path], plain[c][path])


@pytest.mark.parametrize("tensors, message", [
    ({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": (4, 64)},
     r"tensors naming no module of the UNet or the text encoders: 1\n    lora_unet_down_blocks_9"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 64)},
     r"halves without their pair: 1\n    lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight "
     r"\(its up half is missing\)"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 48),
      "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": (64, 4)},
     r"wrong shapes: 1\n    .*\(4, 48\) with .*\(64, 4\): down_blocks.1.attentions.0.proj_in needs \[r, 64\] "
     r"and \[64, r\]"),
])
def test_a_lora_that_does_not_fit_lists_its_tensors(tiny_sdxl_folder, tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, path)
    with pytest.raises(lora.LoraError, match=message):
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, 1.0)])
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded or converted


def test_a_pickled_lora_is_refused(tiny_sdxl_folder, tmp_path):
    path = tmp_path / "lora.pt"
    path.write_bytes(b"not read")
    with pytest.raises(lora.LoraError, match=r"pickled file \(.pt\) .* use the .safetensors version"):
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, 1.0)])


PROJ_IN = "unet.down_blocks.1.attentions.0.proj_in"
KOHYA_PROJ_IN = "lora_unet_down_blocks_1_attentions_0_proj_in"


@pytest.mark.parametrize("extra, metadata, kind", [
    ({}, {"lora_adapter_metadata": json.dumps({"unet.use_dora": True})}, "DoRA"),
    ({f"{PROJ_IN}.lora_magnitude_vector": (64,)}, None, "DoRA"),  # PEFT's, without its config
    ({f"{KOHYA_PROJ_IN}.dora_scale": (1, 64)}, None, "DoRA"),
    ({f"{KOHYA_PROJ_IN}.hada_w1_a": (64, 4), f"{KOHYA_PROJ_IN}.hada_w1_b": (4, 64)}, None, "LoHa"),
    ({f"{KOHYA_PROJ_IN}.lokr_w1": (8, 8), f"{KOHYA_PROJ_IN}.lokr_w2": (8, 8)}, None, "LoKr"),
], ids=["dora-config", "dora-peft", "dora-kohya", "loha", "lokr"])
def test_an_adapter_other_than_lora_is_refused_by_name(tiny_sdxl_folder, tmp_path, extra, metadata, kind):
    """Once "tensors naming no module" for every adapter that is not a plain LoRA."""
    path = tmp_path / "adapter.safetensors"
    tensors = {f"{PROJ_IN}.lora_A.weight": np.zeros((4, 64), np.float32),
               f"{PROJ_IN}.lora_B.weight": np.zeros((64, 4), np.float32)}
    save_file(tensors | {k: np.zeros(shape, np.float32) for k, shape in extra.items()}, path, metadata)
    with pytest.raises(lora.LoraError, match=rf"^LoRA {path} is a {kind} adapter, which jaxfuse does not fuse .* "
                                             "use a plain LoRA.$"):
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, 1.0)])


@pytest.mark.parametrize("bad", ["up", "alpha"])
def test_a_lora_holding_nan_is_named_before_anything_loads(tiny_sdxl_folder, tmp_path, bad):
    """Not "the model's weights hold NaN ... restore the checkpoint": the LoRA and its tensors."""
    path, _ = kohya_file(tmp_path / "k.safetensors", KOHYA_DIFFUSERS_NAMES, seed=7)
    tensors = load_file(path)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    key = f"{name}.lora_up.weight" if bad == "up" else f"{name}.alpha"
    tensors[key] = np.where(np.arange(tensors[key].size).reshape(tensors[key].shape) == 0, np.nan, tensors[key])
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, path)
    with pytest.raises(lora.LoraError, match=rf"^LoRA {path} holds NaN or infinity, .*\n  tensors: 1\n    {key}\n"):
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, 1.0)])
    assert not (tmp_path / "cache").exists()


def test_a_weight_that_overflows_the_weights_names_the_lora(tiny_sdxl_folder, tmp_path):
    """A finite weight whose update float32 cannot hold: the LoRA and its weight are named, not the checkpoint."""
    path, _ = kohya_file(tmp_path / "k.safetensors", TEXT_ENCODERS, seed=8)
    save_file({k: np.asarray(v * 10) for k, v in load_file(path).items()}, path)  # updates of about 100, times 1e38
    with pytest.raises(lora.LoraError, match=rf"^fusing LoRA {path} at weight 1e\+38 leaves NaN or infinity in the "
                                             r"model's weights; lower the weight .*\n  kernels: 2\n    text_encoder/"):
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=[(path, 1e38)])


@pytest.mark.parametrize("loras, message", [
    ([("style.safetensors", "abc")], "LoRA style.safetensors: the weight must be a finite number, got 'abc'."),
    ([("style.safetensors", float("nan"))], "LoRA style.safetensors: the weight must be a finite number, got nan."),
    ([("style.safetensors", True)], "LoRA style.safetensors: the weight must be a finite number, got True."),
    (["style.safetensors"], "loras must be (file, weight) pairs, got 'style.safetensors'."),
    ([(1, 0.5)], "loras must be (file, weight) pairs, got (1, 0.5)."),
])
def test_loras_that_are_not_file_weight_pairs_are_one_clear_error(tiny_sdxl_folder, tmp_path, loras, message):
    """Once a raw TypeError from multiplying by the weight."""
    with pytest.raises(lora.LoraError) as e:
        load_pipeline(tiny_sdxl_folder, cache_dir=tmp_path / "cache", log=lambda _: None, loras=loras)
    assert str(e.value) == message
