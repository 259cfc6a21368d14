"""The judge: a small CNN classifier trained on real images, that scores whether generated samples show
their class (benchmarks/learn.py, configs/learn.yaml).

FID on a few hundred tiny images is noise, and a class's mean colour is not structure. On a set whose
classes differ only by shape (`make-tiny-imagenet --kind shapes`), a classifier trained on the real
train images and accurate on the real val images recognises a sample's class only if the sample draws
that shape: its accuracy on the samples, per CFG scale, is the evidence that the chain learns structure.

Pure torch on uint8 NHWC arrays: images are resized to `size` pixels (antialiased), scaled to [-1, 1];
training shifts each image by up to `shift` pixels (the samples' shapes sit anywhere the real ones do).
Seeded and deterministic on CPU: the same arguments give the same judge.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Judge(nn.Module):
    """Three conv blocks (conv 3x3, BatchNorm, ReLU, 2x2 max-pool), global average pool, linear."""

    def __init__(self, num_classes: int, width: int = 32, size: int = 32):
        super().__init__()
        self.size = size
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_judge(images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None, steps: int = 600,
                batch_size: int = 64, lr: float = 2e-3, width: int = 32, size: int = 32, shift: int = 2,
                blur: float = 0.0, seed: int = 0) -> Judge:
    """Train a Judge on uint8 (N, H, W, 3) images and int labels; AdamW with a cosine lr, seeded."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"train_judge: {len(images)} images and {len(labels)} labels (expected as many, > 0)")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    judge = Judge(num_classes, width, size).train()
    x, y = to_input(images, size), torch.as_tensor(labels, dtype=torch.long)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        batch = _blur(_shift(x[index], shift, generator), blur, generator)
        loss = F.cross_entropy(judge(batch), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The judge's class for each uint8 (N, H, W, 3) image."""
    judge.eval()
    out = [judge(to_input(images[i:i + batch_size], judge.size)).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose predicted class is their label."""
    return float((predict(judge, images) == np.asarray(labels)).mean())


def _blur(x: torch.Tensor, blur: float, generator: torch.Generator) -> torch.Tensor:
    # a Gaussian blur of one random sigma in [0, blur] pixels per batch: decoded samples are softer than
    # the real images, and a judge of shape should not read sharpness as class
    if blur == 0:
        return x
    sigma = float(torch.rand((), generator=generator)) * blur
    if sigma < 0.1:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)  # (C, 1, 1, K), depthwise
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=x.shape[1])


def _shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    # one random translation per batch (reflect padding, then a crop): cheap, and enough on tiny sets
    if shift == 0:
        return x
    dx, dy = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    size = x.shape[-1]
    return padded[..., shift + dy:shift + dy + size, shift + dx:shift + dx + size]
