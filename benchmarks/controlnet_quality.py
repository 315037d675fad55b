"""What the demo ControlNet does on held-out scenes: where the control puts the shapes, what the
prompt makes of them, and how near `displaced` over devices stays to one device.

    python benchmarks/controlnet_quality.py --json benchmarks/controlnet_quality.json   # the full study
    python benchmarks/controlnet_quality.py --prompts 4 --steps 4 --devices 2          # seconds

Held-out scenes (`scenes.sample_scene` from a seed training never draws), each captioned, all in
one batch at the demo's settings (30 Euler steps, guidance 5). The control image of a scene is
`scenes.control_image` in a fixed style: every object a dark grey silhouette (`--blobs`: a rough
blob of about its extent, so that the shape is the prompt's to decide) on a light background.
Rows:
- the demo model alone, the caption as the prompt;
- with the ControlNet, the control drawn from the scene itself (the prompt and the control agree);
- with the control drawn from the scene **moved**: every object one cell down and one right (the
  grid wraps around), the prompt still the original caption. "at the control's places" is the
  prompt accuracy against the moved scene's caption (the prompt's colour and shape where the
  control puts them), "at the prompt's places" against the caption itself;
- the moved case again with blobs;
- the moved case with prompts that name no place ("a red circle and a blue star"), as a live page's
  user types them: the control alone says where;
- the model alone and the moved case split over `--devices` in `displaced` mode: PSNR against
  their one-device images (what the ControlNet adds to displaced's error).
Each row's accuracies are `jaxfuse.demo.detect.prompt_accuracy` in percent: colour, shape and cell
(and colour and cell alone). With `--json`, finished rows are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from quality import NOISE_SEED, accuracy, psnr  # benchmarks/quality.py

from jaxfuse.parallel.mesh import emulate_cpu_devices

HELD_OUT_SEED = 2027 * 1_000_003 + 50_000_000  # training draws its scenes from other seeds
SILHOUETTE = 0.2  # the control's grey level of every object
BACKGROUND = (0.85, 0.8)  # its background, top to bottom


def moved(scene):
    """The scene with every object one cell down and one right, wrapping around the 3x3 grid."""
    from jaxfuse.demo import scenes

    cells = [scenes.cell(obj.position) for obj in scene.objects]
    return scenes.moved_to(scene, [scenes.POSITIONS[3 * ((row + 1) % 3) + (column + 1) % 3] for row, column in cells])


def control(scene, size: int, blobs: bool) -> np.ndarray:
    """The scene's control image [size, size, 3] in the study's fixed style."""
    from jaxfuse.demo import scenes

    count = len(scene.objects)
    style = scenes.ControlStyle((SILHOUETTE,) * count, (blobs,) * count, BACKGROUND, True, 0.0, 0.0, 0)
    return scenes.control_image(scene, size, style)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controlnet", type=Path, default=None, help="default: the built-in demo ControlNet")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--devices", type=int, nargs="*", default=[2, 4], help="displaced on these device counts")
    p.add_argument("--warmup", type=int, default=1, help="displaced's synchronous first steps")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--json", type=Path, help="keep finished rows here; a rerun skips them")
    args = p.parse_args(argv)
    emulate_cpu_devices(8)

    from jaxfuse.demo import DEMO_CONTROLNET, DEMO_MODEL, scenes
    from jaxfuse.parallel_config import ParallelConfig
    from jaxfuse.pipeline import load_pipeline

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    pipe = load_pipeline(DEMO_MODEL, controlnets=[args.controlnet or DEMO_CONTROLNET], log=log)
    size = pipe.spec.default_size
    rng = np.random.default_rng(HELD_OUT_SEED)
    held_out = [scenes.sample_scene(rng) for _ in range(args.prompts)]
    shifted = [moved(scene) for scene in held_out]
    captions, moved_captions = [scenes.caption(s) for s in held_out], [scenes.caption(s) for s in shifted]
    identity = dict(controlnet=str(args.controlnet or "demo"), prompts=args.prompts, steps=args.steps,
                    guidance_scale=args.guidance_scale)
    done = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {r["row"]: r for r in done if all(r.get(k) == v for k, v in identity.items())}

    def generate(control_scenes=None, blobs=False, devices=1, prompts=captions):
        extra = {} if control_scenes is None else dict(
            control_image=np.stack([control(s, size, blobs) for s in control_scenes]))
        parallel = ParallelConfig() if devices == 1 else ParallelConfig(devices, "displaced", args.warmup)
        return pipe.generate(prompts, num_inference_steps=args.steps, seed=NOISE_SEED, parallel=parallel,
                             guidance_scale=args.guidance_scale, **extra).images

    def row(name: str, images: np.ndarray, reference: np.ndarray | None = None) -> dict:
        at_prompt, at_control = accuracy(captions, images), accuracy(moved_captions, images)
        result = dict(identity, row=name, prompt_places=at_prompt, control_places=at_control)
        if reference is not None:
            values = psnr(images, reference)
            result |= dict(psnr=float(values.mean()), psnr_min=float(values.min()))
        log(f"{name}: {result}")
        done[name] = result
        if args.json:
            args.json.write_text(json.dumps(list(done.values()), indent=2))
        return result

    plans = {"the model alone": dict(), "control = the scene": dict(control_scenes=held_out),
             "control = the scene moved": dict(control_scenes=shifted),
             "control = the scene moved, blobs": dict(control_scenes=shifted, blobs=True),
             "control = the scene moved, prompts without places": dict(
                 control_scenes=shifted, prompts=[scenes.caption_without_places(s) for s in held_out])}
    references = {}  # the one-device images the displaced rows are measured against
    compared = {"the model alone": dict(), "control = the scene moved": dict(control_scenes=shifted)}
    for name, settings in plans.items():
        needed = name in compared and any(f"{name}, displaced on {n}" not in done for n in args.devices)
        if name not in done or needed:
            images = generate(**settings)
            references[name] = images
            if name not in done:
                row(name, images)
    for devices in args.devices:
        for name, settings in compared.items():
            if f"{name}, displaced on {devices}" not in done:
                row(f"{name}, displaced on {devices}", generate(**settings, devices=devices), references[name])

    print(f"{args.prompts} held-out scenes, {args.steps} Euler steps, guidance {args.guidance_scale:g}; prompt "
          "accuracy (%) of colour, shape and cell / colour and cell, against the prompt's places and against the "
          "control's (the moved scene's); PSNR against one device\n")
    print("| run | at the prompt's places | at the control's places | PSNR (dB) |\n|---|---|---|---|")
    for r in done.values():
        quality = f"{r['psnr']:.1f} ({r['psnr_min']:.1f})" if "psnr" in r else "-"
        print(f"| {r['row']} | {r['prompt_places']['accuracy']:.1f} / {r['prompt_places']['colour_place']:.1f} | "
              f"{r['control_places']['accuracy']:.1f} / {r['control_places']['colour_place']:.1f} | {quality} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
