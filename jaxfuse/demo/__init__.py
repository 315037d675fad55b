"""The built-in demo model: a small SDXL-architecture pipeline trained here on procedural scenes.

`scenes` draws the captioned scenes, `detect` reads them back from an image, `architecture` holds
the model's configs and writes its diffusers folder, `train` trains it. The trained model ships in
`model/` and is `python -m jaxfuse.generate`'s default. `train_lcm` distils it into a few-step
LCM-LoRA, which ships in `lcm/` and is `generate --lora demo-lcm`. `train_controlnet` trains its
ControlNet (dark shapes on a light ground say where the prompt's shapes go), which ships in
`controlnet/` and is `--controlnet demo-controlnet`.
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "model"
DEMO_LCM_LORA = Path(__file__).parent / "lcm" / "demo-lcm.safetensors"  # for --scheduler lcm --guidance-scale 1
NAMED_LORAS = {"demo-lcm": DEMO_LCM_LORA}  # the names `generate --lora` takes for a file
DEMO_CONTROLNET = Path(__file__).parent / "controlnet"
NAMED_CONTROLNETS = {"demo-controlnet": DEMO_CONTROLNET}  # the names `--controlnet` takes for a folder
DEMO_PROMPT = "a red circle at the top left, a yellow star in the centre and a blue square at the bottom right"
