"""The built-in demo model: a small SDXL-architecture pipeline trained here on procedural scenes.

`scenes` draws the captioned scenes, `detect` reads them back from an image, `architecture` holds
the model's configs and writes its diffusers folder, `train` trains it. The trained model ships in
`model/` and is `python -m jaxfuse.generate`'s default.
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "model"
DEMO_PROMPT = "a red circle at the top left, a yellow star in the centre and a blue square at the bottom right"
