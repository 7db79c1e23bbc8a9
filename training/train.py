"""Train streamline's default model: a tiny Stable Video Diffusion on synthetic motion clips.

    python training/train.py OUT_DIR [--scale quick]

(run through `cargo xtask train-default`, which provides the pinned venv). Writes OUT_DIR/model
(a diffusers StableVideoDiffusionPipeline: unet, vae, image_encoder, scheduler, feature_extractor
and model_index.json, fp16 safetensors) and OUT_DIR/log.json (losses, timings).

Stages, all on CPU with fixed seeds and two torch threads:
1. VAE (AutoencoderKLTemporalDecoder): frames of synthetic clips, L1 + L2 + a light KL term;
   the temporal decoder sees whole 8-frame clips. The clip's first and last frames weigh 4x: the
   decoder's (3, 1, 1) time convolutions see zero padding there, and without the weight a moving
   shape's later path smeared into the first frame. Afterwards `scaling_factor` = 1 / latent std.
2. Encode a fixed set of clips once: clip latents (posterior mean) and the conditioning latents of
   their first frames with the pipeline's noise augmentation (strength 0.02, `mode()`).
3. UNet (UNetSpatioTemporalConditionModel) and the CLIP image encoder together, with SVD's
   objective: EDM noise levels (log-normal, P_mean 0.7, P_std 1.6, plus 20% log-uniform over the
   scheduler's range so the first sampling steps are trained too), v-prediction with the
   EulerDiscreteScheduler's preconditioning (input / sqrt(sigma^2 + 1), timestep 0.25 ln sigma),
   conditioning on the first frame's latent (concatenated) and image embedding (cross-attention),
   added time ids (fps - 1, motion bucket, noise augmentation) = (6, 127, 0.02) as the pipeline's
   defaults; 10% of samples drop both conditions (zeros, as the pipeline's unconditional half) so
   classifier-free guidance works. The first frame's loss weighs 4x: it is the frame that must
   reproduce the conditioning image, and an unweighted run blurred the shape's path into it.
The pipeline is saved in fp16 (checkpoints during stage 3 too).
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler,
                       StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel)
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import \
    _resize_with_antialiasing
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clips  # noqa: E402

SCALES = {
    # steps and sizes of the committed model (about an hour on 2 cores)
    "full": {"vae_steps": 1300, "vae_batch": 2, "clips": 2000, "unet_steps": 3000,
             "unet_batch": 4, "checkpoints": 3},
    # a smoke run of the whole program
    "quick": {"vae_steps": 4, "vae_batch": 1, "clips": 8, "unet_steps": 4, "unet_batch": 2,
              "checkpoints": 2},
}
SEED = 20261126
FPS, MOTION_BUCKET, NOISE_AUG = 7, 127, 0.02
P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX = 0.7, 1.6, 0.002, 700.0
# Per-frame loss weights (see the stages above), normalised to mean 1.
VAE_FRAME_WEIGHTS = torch.tensor([4.0] + [1.0] * (clips.FRAMES - 2) + [4.0])
UNET_FRAME_WEIGHTS = torch.tensor([4.0] + [1.0] * (clips.FRAMES - 1))
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def build():
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=4, sample_size=clips.HEIGHT)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=clips.HEIGHT // 4, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                          "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                        "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(64, 96, 96), addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=96, layers_per_block=1, cross_attention_dim=64,
        transformer_layers_per_block=1, num_attention_heads=(2, 3, 3), num_frames=clips.FRAMES)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=64, image_size=224, patch_size=32, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=SIGMA_MAX,
        sigma_min=SIGMA_MIN, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True, interpolation_type="linear")
    return vae, unet, image_encoder, scheduler


def batch_of_clips(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, F, 3, H, W) in [-1, 1]."""
    return torch.stack([clips.clip(g) for _ in range(n)]) * 2 - 1


class Log:
    def __init__(self):
        self.start = time.time()
        self.records = {}

    def __call__(self, stage: str, step: int, total: int, **values):
        self.records.setdefault(stage, []).append({"step": step, **values})
        if step % 50 == 0 or step == total - 1:
            shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
            print(f"[{time.time() - self.start:7.1f}s] {stage} {step + 1}/{total} {shown}",
                  flush=True)


def per_frame(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of an elementwise loss shaped (batch, frames, ...) with frames weighted."""
    by_frame = loss.flatten(2).mean(dim=2).mean(dim=0)
    return (by_frame * weights).sum() / weights.sum()


def train_vae(vae, scale, log):
    g = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps = scale["vae_steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps,
                                                pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = batch_of_clips(g, scale["vae_batch"])
        frames = x.flatten(0, 1)
        post = vae.encode(frames).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z, num_frames=clips.FRAMES).sample
        err = (rec - frames).unflatten(0, (-1, clips.FRAMES))
        l2 = (err ** 2).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = per_frame(err.abs() + err ** 2, VAE_FRAME_WEIGHTS) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        psnr = 10 * math.log10(4.0 / max(l2.item(), 1e-12))
        log("vae", step, steps, loss=loss.item(), psnr=psnr, kl=kl.item())
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, scale, log):
    """Clip latents (unscaled), conditioning latents and first frames of a fixed clip set."""
    g = torch.Generator().manual_seed(SEED + 2)
    latents, cond, first = [], [], []
    for i in range(scale["clips"]):
        x = batch_of_clips(g, 1)[0]
        latents.append(vae.encode(x).latent_dist.mean)
        noisy = x[:1] + NOISE_AUG * torch.randn(x[:1].shape, generator=g)
        cond.append(vae.encode(noisy).latent_dist.mode()[0])
        first.append(x[0])
        if i % 250 == 0:
            log("encode", i, scale["clips"])
    return torch.stack(latents), torch.stack(cond), torch.stack(first)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """The pipeline's `_encode_image` preprocessing of images in [-1, 1]."""
    x = _resize_with_antialiasing(images, (224, 224))
    return ((x + 1) / 2 - CLIP_MEAN) / CLIP_STD


def train_unet(unet, image_encoder, data, scaling_factor, scale, log, checkpoint):
    latents, cond, first = data
    g = torch.Generator().manual_seed(SEED + 3)
    params = list(unet.parameters()) + list(image_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    steps, b = scale["unet_steps"], scale["unet_batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps,
                                                pct_start=0.05)
    ids = torch.tensor([[FPS - 1, MOTION_BUCKET, NOISE_AUG]], dtype=torch.float32).repeat(b, 1)
    unet.train()
    image_encoder.train()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (b,), generator=g)
        x0 = latents[idx] * scaling_factor
        keep = (torch.rand(b, generator=g) >= 0.1).float()
        c = cond[idx] * keep.view(b, 1, 1, 1)
        emb = image_encoder(clip_pixels(first[idx])).image_embeds.unsqueeze(1)
        emb = emb * keep.view(b, 1, 1)
        log_sigma = P_MEAN + P_STD * torch.randn(b, generator=g)
        uniform = math.log(SIGMA_MIN) + (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) * torch.rand(
            b, generator=g)
        log_sigma = torch.where(torch.rand(b, generator=g) < 0.2, uniform, log_sigma)
        sigma = log_sigma.clamp(math.log(SIGMA_MIN), math.log(SIGMA_MAX)).exp().view(b, 1, 1, 1, 1)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=g)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        inp = torch.cat([noisy * c_in, c.unsqueeze(1).expand_as(x0)], dim=2)
        out = unet(inp, 0.25 * sigma.view(b).log(), emb, ids).sample
        # denoised = c_out * out + c_skip * noisy, EDM weight (sigma^2+1)/sigma^2 makes the loss
        # the plain MSE to this v target.
        c_skip, c_out = 1 / (sigma ** 2 + 1), -sigma * c_in
        target = (x0 - c_skip * noisy) / c_out
        loss = per_frame((out - target) ** 2, UNET_FRAME_WEIGHTS)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log("unet", step, steps, loss=loss.item())
        if (step + 1) % (steps // scale["checkpoints"]) == 0 and step + 1 < steps:
            checkpoint(step + 1)
    unet.eval()
    image_encoder.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    log = Log()

    vae, unet, image_encoder, scheduler = build()
    for name, m in (("vae", vae), ("unet", unet), ("image_encoder", image_encoder)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters")
    train_vae(vae, scale, log)
    data = encode_dataset(vae, scale, log)
    scaling_factor = float(1.0 / data[0].std())
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"scaling_factor = {scaling_factor:.5f}")
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))

    def save(path):
        # fp16 files keep the model under 25 MB; training itself stays in fp32 (on a copy, so
        # a checkpoint does not round the weights being trained).
        copy.deepcopy(pipe).to(dtype=torch.float16).save_pretrained(path, safe_serialization=True)
        print(f"saved {path}", flush=True)

    train_unet(unet, image_encoder, data, scaling_factor, scale, log,
               lambda step: save(os.path.join(args.out, f"checkpoint-{step}")))
    save(os.path.join(args.out, "model"))
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump({"scale": args.scale, "seconds": time.time() - log.start,
                   "scaling_factor": scaling_factor, "records": log.records}, f)
    print(f"done in {time.time() - log.start:.0f}s: {args.out}")


if __name__ == "__main__":
    main()
