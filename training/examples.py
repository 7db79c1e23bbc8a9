"""Write the default model's example conditioning images: one per shape class.

    python training/examples.py OUT_DIR

Each is a frame the training clips could start with (same backgrounds, colours and sizes), with
the shape placed so its whole taught path stays in view. The README's first command and the
motion test (crates/streamline-pipeline/tests/default_model.rs) use them.
"""

import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clips  # noqa: E402

# name: (colour, shape, centre y, centre x, half-size, background seed)
EXAMPLES = {
    "red": ("red", "circle", 32.0, 14.0, 7.0, 11),
    "blue": ("blue", "square", 12.0, 30.0, 6.0, 12),
    "green": ("green", "circle", 50.0, 34.0, 7.0, 13),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, (colour, kind, cy, cx, r, seed) in EXAMPLES.items():
        image = clips.example(colour, kind, cy, cx, r, seed)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(out, f"{name}.png"))


if __name__ == "__main__":
    main()
