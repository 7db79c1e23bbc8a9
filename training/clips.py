"""Synthetic clips for the default model: textured backgrounds, coloured shapes, taught motion.

Every clip is static textured background plus one or two shapes. A shape's colour decides its
motion, so a generated video can be checked against the rule:

    red   -> moves right
    blue  -> moves down
    green -> moves up

by `SPEED` pixels per frame (28 px, 44% of a 64-px frame, over 8 frames). Backgrounds are smooth
gratings in desaturated colours so that shape pixels can be told apart by saturation alone; the
motion test in crates/streamline-pipeline/tests/default_model.rs uses the same colour rule.
"""

import math

import torch

HEIGHT = WIDTH = 64
FRAMES = 8
SPEED = 4.0
COLOURS = {"red": (0.90, 0.12, 0.10), "blue": (0.10, 0.25, 0.95), "green": (0.10, 0.80, 0.15)}
# (dy, dx) per frame, image coordinates (y grows downwards).
MOTION = {"red": (0.0, SPEED), "blue": (SPEED, 0.0), "green": (-SPEED, 0.0)}
CLASSES = list(COLOURS)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def background(g: torch.Generator) -> torch.Tensor:
    """(3, H, W) in [0.2, 0.8]: a grey level, a faint tint and four random gratings."""
    yy, xx = torch.meshgrid(torch.arange(HEIGHT, dtype=torch.float32) / HEIGHT,
                            torch.arange(WIDTH, dtype=torch.float32) / WIDTH, indexing="ij")
    field = torch.zeros(HEIGHT, WIDTH)
    for _ in range(4):
        angle = _uniform(g, 0.0, math.pi)
        freq = _uniform(g, 1.0, 4.0)
        phase = _uniform(g, 0.0, 2 * math.pi)
        amp = _uniform(g, 0.02, 0.07)
        field += amp * torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))
                                 + phase)
    grey = _uniform(g, 0.35, 0.65)
    tint = torch.tensor([_uniform(g, -0.04, 0.04) for _ in range(3)]).view(3, 1, 1)
    return (grey + tint + field.unsqueeze(0)).clamp(0.2, 0.8)


def _mask(kind: str, cy: float, cx: float, r: float) -> torch.Tensor:
    """(H, W) soft coverage of a circle or square of half-size r centred at (cy, cx)."""
    yy, xx = torch.meshgrid(torch.arange(HEIGHT, dtype=torch.float32) + 0.5,
                            torch.arange(WIDTH, dtype=torch.float32) + 0.5, indexing="ij")
    if kind == "circle":
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    else:
        dist = torch.maximum((yy - cy).abs(), (xx - cx).abs())
    return (r - dist + 0.5).clamp(0.0, 1.0)


def _start(g: torch.Generator, colour: str, r: float) -> tuple[float, float]:
    """A start centre from which the whole path stays inside the frame."""
    dy, dx = MOTION[colour]
    travel_y, travel_x = dy * (FRAMES - 1), dx * (FRAMES - 1)
    lo_y, hi_y = r + 2 - min(travel_y, 0), HEIGHT - r - 2 - max(travel_y, 0)
    lo_x, hi_x = r + 2 - min(travel_x, 0), WIDTH - r - 2 - max(travel_x, 0)
    return _uniform(g, lo_y, hi_y), _uniform(g, lo_x, hi_x)


def clip(g: torch.Generator) -> torch.Tensor:
    """(F, 3, H, W) in [0, 1]: one clip following the motion rule."""
    bg = background(g)
    count = 1 if torch.rand((), generator=g).item() < 0.6 else 2
    order = torch.randperm(len(CLASSES), generator=g)[:count].tolist()
    shapes = []
    for i in order:
        colour = CLASSES[i]
        kind = "circle" if torch.rand((), generator=g).item() < 0.5 else "square"
        r = _uniform(g, 5.0, 8.0)
        shade = torch.tensor(COLOURS[colour]) * _uniform(g, 0.9, 1.05)
        cy, cx = _start(g, colour, r)
        shapes.append((colour, kind, r, shade.clamp(0, 1).view(3, 1, 1), cy, cx))
    frames = []
    for t in range(FRAMES):
        frame = bg.clone()
        for colour, kind, r, shade, cy, cx in shapes:
            dy, dx = MOTION[colour]
            m = _mask(kind, cy + t * dy, cx + t * dx, r)
            frame = frame * (1 - m) + shade * m
        frames.append(frame)
    return torch.stack(frames)


def example(colour: str, kind: str, cy: float, cx: float, r: float, seed: int) -> torch.Tensor:
    """(3, H, W): a conditioning image with one shape of `colour` at (cy, cx)."""
    bg = background(torch.Generator().manual_seed(seed))
    m = _mask(kind, cy, cx, r)
    return bg * (1 - m) + torch.tensor(COLOURS[colour]).view(3, 1, 1) * m
