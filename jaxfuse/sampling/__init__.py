"""Sampling loops over the UNet: `step` is the one UNet prediction of one denoising step that every
loop and the cost analysis run; `image` is the loop that denoises one batch of images."""
