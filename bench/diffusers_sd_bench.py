"""diffusers beside diffuse on the CPU: the Stable Diffusion 1.5-shaped UNet2DConditionModel (random weights), batch 2
(one CFG pair) at 64x64 latents, and a whole StableDiffusionPipeline run, timed in the Debian 13 root that
bench/sd_compare.sh prepares (python3-torch 2.6, diffusers and transformers from ../shared/device-kit sources).
usage: diffusers_sd_bench.py make PIPE TOKENIZER_DIR     write a random-weight SD 1.5-shaped pipeline folder
       diffusers_sd_bench.py unet fp32|bf16 ITERS        seconds per UNet forward (bf16: CPU autocast)
       diffusers_sd_bench.py pipe PIPE STEPS             seconds of a StableDiffusionPipeline run (1 image, CFG 7.5)
       diffusers_sd_bench.py train ITERS CKPT            seconds per training step (batch 1 at 64x64: forward, MSE,
                                                         backward, AdamW), CKPT 1: enable_gradient_checkpointing()
The import-time stubs are those of tests/fixtures/generators/gen_fixtures_t2i.py (huggingface_hub, tokenizers)."""
import os, resource, sys, time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "generators"))
import t2i_env  # noqa: E402,F401  (stubs before diffusers / transformers)
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest are the class defaults
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


mode = sys.argv[1]
if mode == "make":
    torch.manual_seed(0)
    tok = CLIPTokenizer(f"{sys.argv[3]}/vocab.json", f"{sys.argv[3]}/merges.txt", pad_token="<|endoftext|>",
                        model_max_length=77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=te, tokenizer=tok,
                                   unet=UNet2DConditionModel(**SD15_UNET), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(sys.argv[2], safe_serialization=True)
    print("wrote", sys.argv[2])
elif mode == "unet":
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    x, ctx, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.full((2,), 500)
    bf16 = sys.argv[2] == "bf16"
    times = []
    for i in range(int(sys.argv[3]) + 1):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            times.append(time.perf_counter() - t0)
    print(f"diffusers UNet forward {sys.argv[2]}: best {min(times[1:]):.2f} s, mean {sum(times[1:]) / len(times[1:]):.2f} s "
          f"(warm-up {times[0]:.2f} s); peak RSS {peak_gib():.2f} GiB; torch {torch.__version__}", flush=True)
elif mode == "train":
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).train()
    if sys.argv[3] == "1":
        unet.enable_gradient_checkpointing()
    adam = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    x, ctx, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.full((1,), 500)
    target = torch.randn_like(x)
    times = []
    for i in range(int(sys.argv[2]) + 1):
        t0 = time.perf_counter()
        adam.zero_grad()
        torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, target).backward()
        adam.step()
        times.append(time.perf_counter() - t0)
    print(f"diffusers UNet training step, gradient checkpointing {'on' if sys.argv[3] == '1' else 'off'}: best "
          f"{min(times[1:]):.2f} s, mean {sum(times[1:]) / len(times[1:]):.2f} s (warm-up {times[0]:.2f} s); "
          f"peak RSS {peak_gib():.2f} GiB", flush=True)
elif mode == "pipe":
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=int(sys.argv[3]), guidance_scale=7.5,
         height=512, width=512, generator=torch.Generator().manual_seed(0))
    print(f"diffusers StableDiffusionPipeline {sys.argv[3]} steps: {time.perf_counter() - t0:.1f} s; "
          f"peak RSS {peak_gib():.2f} GiB", flush=True)
