"""Where a batch-8 768px MagicMix call spends its time on the GPU (fp16, SDPA, no compile)."""

import time

import torch
from PIL import Image

from magicmix.engine import EngineOptions, MagicMixEngine
from magicmix.engine.builder import _sd15_modules, build_clip_tokenizer, sd_scheduler
from magicmix.engine.loading import Components
from magicmix.families import SD1
from magicmix.request import MixRequest

dev = torch.device("cuda")
unet, vae, te = _sd15_modules()
for m in (unet, vae, te):
    m.to(dev, torch.float16).eval()
eng = MagicMixEngine(
    Components(SD1, vae, unet, sd_scheduler(), (te,), (build_clip_tokenizer(),)),
    device=dev,
    dtype=torch.float16,
    options=EngineOptions(channels_last=True),
)
img = Image.new("RGB", (768, 768), (120, 80, 40))


def timed(label, fn, n=3):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - t) / n * 1000:.1f} ms")


def breakdown(batch: int) -> None:
    reqs = [MixRequest(image=img, prompt=f"p{i}", seed=i) for i in range(batch)]
    with torch.inference_mode():
        z = eng._encode_images(reqs)
        txt = eng.conditioner.condition(reqs, *eng._encode_prompts(reqs))
        g = eng._per_sample([7.5] * batch)
        t = torch.tensor(500)
        timed(f"b{batch} total mix", lambda: eng.mix(reqs, progress=False))
        timed(f"b{batch} vae encode", lambda: eng._encode_images(reqs))
        timed(f"b{batch} unet x10", lambda: [eng._guided_noise(z, t, txt, g) for _ in range(10)])
        timed(f"b{batch} vae decode+pil", lambda: eng._decode(z))
        scaled = z / vae.config.scaling_factor
        timed(f"b{batch} vae decode only", lambda: vae.decode(scaled).sample)


for size in (1, 8):
    breakdown(size)
