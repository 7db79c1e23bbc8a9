"""The diffusers peer of `cargo xtask bench`: one measurement per process, like streamline-bench.

    python diffusers_peer.py unet --dir DIR [--chunking] [--device cuda] --runs N --out M.json --output O.safetensors
    python diffusers_peer.py svd --model DIR --image PNG --inputs I.safetensors --steps 25 ...
    python diffusers_peer.py kernels --cases bench/scenarios.toml --runs N --out K.json

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
    device = torch.device(args.device)
    model.to(device)
    io = {k: v.to(device) for k, v in load_file(f"{args.dir}/inputs.safetensors").items()}
    cuda = device.type == "cuda"

    def step():
        start = time.perf_counter()
        out = call(io)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    base = take_baseline()
    if cuda:
        # The device peak above what the weights and inputs hold, from torch's allocator.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    output, _ = step()
    rss = status_bytes("VmHWM") - base
    measurement = {"denoise_seconds": [], "peak_rss_above_baseline_bytes": rss}
    if cuda:
        measurement["device_peak_bytes"] = torch.cuda.max_memory_allocated() - held
    measurement["step_seconds"] = [step()[1] for _ in range(args.runs)]
    return measurement, output.cpu()


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


def kernels(args):
    """PyTorch's ops on the `[[kernel]]` cases of the scenarios file, as streamline-bench times
    its kernels: a warm-up call, then the median of `--runs` timed calls."""
    import statistics
    import tomllib

    import torch.nn.functional as F

    with open(args.cases, "rb") as f:
        cases = tomllib.load(f)["kernel"]
    timings = []
    for c in cases:
        x = torch.randn(c["input"])
        if c["op"] == "conv2d":
            w = torch.randn(c["out_channels"], x.shape[1], c["kernel"], c["kernel"]) * 0.05
            b = torch.randn(c["out_channels"])
            call = lambda: F.conv2d(x, w, b, stride=c.get("stride", 1), padding=c.get("padding", 0))
        elif c["op"] == "group_norm":
            w, b = torch.randn(x.shape[1]), torch.randn(x.shape[1])
            call = lambda: F.group_norm(x, c["groups"], w, b, 1e-5)
        elif c["op"] == "attention":
            k, v, heads = torch.randn(c["input"]), torch.randn(c["input"]), c.get("heads", 1)
            n, length, dim = x.shape

            def call():
                split = lambda t: t.view(n, -1, heads, dim // heads).transpose(1, 2)
                out = F.scaled_dot_product_attention(split(x), split(k), split(v))
                return out.transpose(1, 2).reshape(n, length, dim)
        elif c["op"] == "geglu":
            w = torch.randn(2 * c["inner"], x.shape[1]) * 0.1
            b = torch.randn(2 * c["inner"])

            def call():
                h, gate = F.linear(x, w, b).chunk(2, dim=-1)
                return h * F.gelu(gate)
        else:
            raise SystemExit(f"kernel case {c['name']}: unknown op {c['op']}")
        call()
        times = []
        for _ in range(max(args.runs, 1)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        timings.append({"name": c["name"], "torch_seconds": statistics.median(times)})
    with open(args.out, "w") as f:
        json.dump(timings, f, indent=2)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="task", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--cases", required=True)
    k.add_argument("--runs", type=int, default=3)
    k.add_argument("--out", required=True)
    for name in ("unet", "svd"):
        p = sub.add_parser(name)
        p.add_argument("--chunking", action="store_true")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--out", required=True)
        p.add_argument("--output", required=True)
    sub.choices["unet"].add_argument("--dir", required=True)
    sub.choices["unet"].add_argument("--device", default="cpu")
    for flag in ("--model", "--image", "--inputs"):
        sub.choices["svd"].add_argument(flag, required=True)
    sub.choices["svd"].add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    if args.task == "kernels":
        with torch.no_grad():
            return kernels(args)
    with torch.no_grad():
        measurement, output = (unet if args.task == "unet" else svd)(args)
    save_file({"output": output.contiguous()}, args.output)
    with open(args.out, "w") as f:
        json.dump(measurement, f, indent=2)


if __name__ == "__main__":
    main()
