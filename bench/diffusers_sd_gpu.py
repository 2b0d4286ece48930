"""diffusers beside diffuse on a GPU (bench/sd_gpu_compare.sh): the Stable Diffusion 1.5-shaped UNet2DConditionModel
(random weights) in eager mode with SDPA (diffusers' default attention processor under PyTorch 2), and a whole
text-to-image run as StableDiffusionPipeline.__call__ does it, timed after a warm-up. Needs the device kit's diffusers
(PYTHONPATH=.devkit) and the machine's transformers (CLIPTextModel).
usage: diffusers_sd_gpu.py unet fp16|bf16 BATCHxSIZE ...   milliseconds per UNet forward (one CFG pair is batch 2)
       diffusers_sd_gpu.py pipe fp16|bf16 STEPS              seconds of a 512x512 run: the prompt and the empty negative
                                                             prompt encoded, STEPS DDIM steps of CFG 7.5 on the doubled
                                                             batch, the VAE decode (tokenizing and the PIL conversion left
                                                             out: the token ids are fixed)
Each figure carries the caching allocator's peak (torch.cuda.max_memory_allocated) since the previous one."""
import os, sys, time
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

dev = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu only to check the script where no GPU is
cuda = dev.startswith("cuda")
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[2]]
torch.backends.cudnn.benchmark = True  # as diffuse does on a GPU
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest are the class defaults
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)


def peak():
    if not cuda:
        return "no GPU"
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"peak GPU memory {gib:.2f} GiB"


def timed(f, warmup, iters):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        f()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), sum(times) / len(times)


torch.manual_seed(0)
unet = UNet2DConditionModel(**SD15_UNET).to(dev, dtype).eval()
print(f"diffusers UNet2DConditionModel {sum(p.numel() for p in unet.parameters())} parameters, {sys.argv[2]}, "
      f"attention {type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}; torch {torch.__version__}, "
      f"{torch.cuda.get_device_name() if cuda else dev}", flush=True)
if sys.argv[1] == "unet":
    for shape in sys.argv[3:]:
        batch, size = map(int, shape.split("x"))
        x = torch.randn(batch, 4, size, size, device=dev, dtype=dtype)
        ctx = torch.randn(batch, 77, 768, device=dev, dtype=dtype)
        t = torch.full((batch,), 500, device=dev)
        peak()
        with torch.inference_mode():
            best, mean = timed(lambda: unet(x, t, encoder_hidden_states=ctx, return_dict=False), int(os.environ.get("WARMUP", 3)), int(os.environ.get("ITERS", 20)))
        print(f"diffusers UNet forward {sys.argv[2]} batch {batch} at {size}x{size}: best {best * 1e3:.2f} ms, mean "
              f"{mean * 1e3:.2f} ms; {peak()}", flush=True)
elif sys.argv[1] == "pipe":
    steps = int(sys.argv[3])
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768)).to(dev, dtype).eval()
    vae = AutoencoderKL(**SD15_VAE).to(dev, dtype).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    ids = torch.tensor([[49406] + [320, 1125, 539, 550, 18376, 6765, 525, 320, 4558, 525, 7496] + [49407] * 65], device=dev)
    empty = torch.tensor([[49406] + [49407] * 76], device=dev)
    g = torch.Generator(dev).manual_seed(0)

    def run():  # StableDiffusionPipeline.__call__ with guidance_scale 7.5, output_type "pt"
        with torch.inference_mode():
            embeds = torch.cat([te(empty)[0], te(ids)[0]])
            sched.set_timesteps(steps, device=dev)
            latents = torch.randn(1, 4, 64, 64, generator=g, device=dev, dtype=dtype) * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([latents] * 2), t)
                uncond, cond = unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
                latents = sched.step(uncond + 7.5 * (cond - uncond), t, latents, return_dict=False)[0]
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            return (image / 2 + 0.5).clamp(0, 1).float().cpu()

    peak()
    best, mean = timed(run, int(os.environ.get("WARMUP", 1)), int(os.environ.get("ITERS", 3)))
    print(f"diffusers text-to-image {steps} steps 512x512 {sys.argv[2]}: best {best:.3f} s, mean {mean:.3f} s "
          f"({best / steps * 1e3:.1f} ms per step); {peak()}", flush=True)
