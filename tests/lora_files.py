"""LoRA files for the tests, made by PEFT and saved by diffusers, as users get them."""

import re

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file


def peft_file(folder, tmp_path) -> tuple[object, dict]:
    """A diffusers-format LoRA of random weights, saved by diffusers from PEFT adapters: UNet
    attention, feed-forward, projection and convolution layers, both text encoders' attention and
    MLP, alpha != r so the scale is read from the file's metadata; and its text-encoder scales
    (see `diffusers_images`)."""
    torch.manual_seed(0)
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
                           alpha_pattern={"down_blocks.1.attentions.0.proj_in": 2}),
        "text_encoder": LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "fc1"]),
        "text_encoder_2": LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["v_proj", "out_proj"]),
    }
    layers, metadata = {}, {}
    for component, config in configs.items():
        model = inject_adapter_in_model(config, getattr(reference, component))
        with torch.no_grad():  # PEFT's random B is as large as A: keep the LoRAs a nudge
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.2)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, weight_name="peft.safetensors", **layers, **metadata)
    path = tmp_path / "peft.safetensors"
    text_scales = {}
    for key in load_file(path):
        if m := re.fullmatch(r"(text_encoder(?:_2)?)\.(.+)\.lora_A\.weight", key):
            config = configs[m[1]]
            text_scales[key] = (m[1], m[2], config.lora_alpha / config.r)
    return path, text_scales
