"""The diffusers peer of `cargo xtask bench`: one measurement per process, like streamline-bench.

    python diffusers_peer.py unet --dir DIR [--chunking] --runs N --out M.json --output O.safetensors
    python diffusers_peer.py svd --model DIR --image PNG --inputs I.safetensors --steps 25 ...

Same weights (the safetensors streamline reads), same inputs, same memory method: the first run
after loading is measured from a fresh baseline (VmHWM reset through /proc/self/clear_refs), then
`--runs` timed runs follow. `--chunking` turns on diffusers' `enable_forward_chunking`, its own
memory saver for these models. Writes the same JSON fields as streamline-bench.
"""

import argparse
import json
import os
import time

import torch
from PIL import Image
from safetensors.torch import load_file, save_file


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def take_baseline():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def load_unet(path):
    """SVD's UNet, or AnimateDiff's assembled from `unet/` + `motion_adapter/` as its pipeline
    does; returns the model and a step function on streamline's (B, T, C, H, W) layout."""
    if os.path.isdir(f"{path}/motion_adapter"):
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

        model = UNetMotionModel.from_unet2d(
            UNet2DConditionModel.from_pretrained(f"{path}/unet"),
            MotionAdapter.from_pretrained(f"{path}/motion_adapter")).eval()

        def call(io):
            sample = io["sample"].permute(0, 2, 1, 3, 4)  # diffusers' (B, C, F, H, W)
            out = model(sample, io["timestep"], encoder_hidden_states=io["encoder_hidden_states"],
                        return_dict=False)[0]
            return out.permute(0, 2, 1, 3, 4)
    else:
        from diffusers import UNetSpatioTemporalConditionModel

        model = UNetSpatioTemporalConditionModel.from_pretrained(f"{path}/unet").eval()

        def call(io):
            return model(io["sample"], io["timestep"], io["encoder_hidden_states"],
                         io["added_time_ids"], return_dict=False)[0]
    return model, call


def unet(args):
    model, call = load_unet(args.dir)
    if args.chunking:
        model.enable_forward_chunking()
    io = load_file(f"{args.dir}/inputs.safetensors")

    def step():
        start = time.perf_counter()
        out = call(io)
        return out, time.perf_counter() - start

    base = take_baseline()
    output, _ = step()
    rss = status_bytes("VmHWM") - base
    times = [step()[1] for _ in range(args.runs)]
    return {"step_seconds": times, "denoise_seconds": [], "peak_rss_above_baseline_bytes": rss}, output


def svd(args):
    import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion as module
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.chunking:
        pipe.unet.enable_forward_chunking()
    io = load_file(args.inputs)
    # The noise-augmentation noise is the pipeline's only draw besides the latents: give it ours.
    module.randn_tensor = lambda *a, **k: io["image_noise"].clone()
    image = Image.open(args.image).convert("RGB")
    height, width = io["image_noise"].shape[2:]
    marks = {}
    unet_forward = pipe.unet.forward

    def timed_forward(*a, **k):
        marks.setdefault("start", time.perf_counter())
        return unet_forward(*a, **k)

    pipe.unet.forward = timed_forward

    def run():
        marks.clear()

        def on_step_end(_pipe, _i, _t, kwargs):
            marks["end"] = time.perf_counter()
            return kwargs

        frames = pipe(image, height=height, width=width, num_frames=io["latents"].shape[1],
                      num_inference_steps=args.steps, latents=io["latents"].clone(),
                      output_type="pt", callback_on_step_end=on_step_end).frames[0]
        return frames, marks["end"] - marks["start"]

    base = take_baseline()
    frames, _ = run()
    rss = status_bytes("VmHWM") - base
    denoise = [run()[1] for _ in range(args.runs)]
    return {"step_seconds": [d / args.steps for d in denoise], "denoise_seconds": denoise,
            "peak_rss_above_baseline_bytes": rss}, frames


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="task", required=True)
    for name in ("unet", "svd"):
        p = sub.add_parser(name)
        p.add_argument("--chunking", action="store_true")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--out", required=True)
        p.add_argument("--output", required=True)
    sub.choices["unet"].add_argument("--dir", required=True)
    for flag in ("--model", "--image", "--inputs"):
        sub.choices["svd"].add_argument(flag, required=True)
    sub.choices["svd"].add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    with torch.no_grad():
        measurement, output = (unet if args.task == "unet" else svd)(args)
    save_file({"output": output.contiguous()}, args.output)
    with open(args.out, "w") as f:
        json.dump(measurement, f, indent=2)


if __name__ == "__main__":
    main()
