"""Loads a `diffuse train --model` run folder with diffusers' StableDiffusionPipeline.from_pretrained (and its unet_ema/
with UNet2DConditionModel.from_pretrained) and samples 3 steps: the run is a diffusers pipeline. Run it where diffusers
and transformers import, e.g. in the LibTorch 2.x lane's Debian 13 root as bench/sd_compare.sh prepares it, with
tests/fixtures/generators on PYTHONPATH (the import-time stubs of t2i_env.py):
  chroot ROOT /usr/bin/env -i PATH=/usr/bin:/bin PYTHONPATH=/opt/sdsrc:/opt/gen python3 check_finetune_in_diffusers.py RUN
Measured 2026-12-04 (diffusers 0.40.0.dev0, torch 2.6): a 2-step fine-tune of tests/fixtures/text-to-image/sd1/pipe with
--prediction v --zero-snr loads as DDIMScheduler v_prediction, rescale_betas_zero_snr True, trailing, and samples."""
import sys

import t2i_env  # noqa: F401  (stubs before diffusers / transformers)
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

run = sys.argv[1]
pipe = StableDiffusionPipeline.from_pretrained(run, safety_checker=None, requires_safety_checker=False)
c = pipe.scheduler.config
print(type(pipe.scheduler).__name__, c.prediction_type, "rescale_betas_zero_snr", c.rescale_betas_zero_snr, c.timestep_spacing)
UNet2DConditionModel.from_pretrained(f"{run}/unet_ema")
size = 8 * pipe.unet.config.sample_size
out = pipe("a dark photo of a bag", num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7, height=size,
           width=size, output_type="np", generator=torch.Generator().manual_seed(0))
print("sampled", out.images.shape, "mean", float(out.images.mean()))
