"""Live generation (StreamDiffusion) on a loaded pipeline: frames or nothing in, images out.

`Stream` is the device side: one compiled call that encodes the entering frames, advances every
image in flight one step (`jaxfuse.sampling.stream`) and decodes the one that leaves.
`python -m jaxfuse.stream` is the command line.
"""

from jaxfuse.stream.program import Stream

__all__ = ["Stream"]
