"""Write an MNIST-shaped stand-in (idx files, 28x28 uint8) made from the embedded digits data.

Not MNIST: each 8x8 digits image is upsampled to a 16-22 pixel square, its strokes saturated
towards 0 and 1 (MNIST's are nearly binary), placed at a random offset in a 28x28 frame, given a
random contrast and a little noise. Training images come from the
digits training split and test images from its test split, so the two never share a source image.
``certkd.data`` reads the files as the ``mnist`` dataset (``--dataset mnist --data-dir OUT``).

    python examples/mnist_standin.py OUT [--train 6000] [--test 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from certkd.data import load_dataset

SIZE = 28
STROKE_GAIN = 12.0


def idx_bytes(array: torch.Tensor) -> bytes:
    """The idx encoding of a uint8 tensor: magic ``00 00 08 ndim``, big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.contiguous().numpy().tobytes()


def standin_split(split: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (N, 28, 28) uint8 and labels drawn with replacement from the digits ``split``."""
    source = load_dataset("digits", split)
    pick = torch.randint(0, len(source), (n,), generator=generator)
    images = torch.zeros(n, SIZE, SIZE)
    for i, j in enumerate(pick.tolist()):
        side = int(torch.randint(16, 23, (1,), generator=generator))
        glyph = F.interpolate(source.x[j:j + 1], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        top, left = (int(torch.randint(0, SIZE - side + 1, (1,), generator=generator)) for _ in range(2))
        contrast = 0.85 + 0.15 * float(torch.rand(1, generator=generator))
        images[i, top:top + side, left:left + side] = torch.sigmoid(STROKE_GAIN * (glyph - 0.4)) * contrast
    images = (images + 0.02 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), source.y[pick].to(torch.uint8)


def write_standin(out: Path, n_train: int = 6000, n_test: int = 1000, seed: int = 0) -> Path:
    """Write the four gzipped idx files of the stand-in into ``out``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = standin_split(split, n, gen)
        (out / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (out / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_standin(args.out, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
