"""Specification of the judge (pipeline/metrics/judge.py): a small CNN that scores whether images show their class."""

import numpy as np
import torch

from pipeline.metrics.judge import accuracy, predict, train_judge


def _toy(n: int, seed: int):
    # class 0: a bright square in the left half, class 1: in the right half; colours and noise shared
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 16, 16, 3)).astype(np.uint8)
    for img, y in zip(images, labels, strict=True):
        x0, y0 = rng.integers(0, 4) + 8 * y, rng.integers(0, 10)
        img[y0:y0 + 6, x0:x0 + 4] = rng.integers(150, 256, 3)
    return images, labels


def test_the_judge_learns_a_separable_toy_set_and_scores_held_out_images():
    images, labels = _toy(256, seed=0)
    held_out, held_labels = _toy(128, seed=1)
    judge = train_judge(images, labels, steps=60, batch_size=32, width=8, size=16, shift=1)
    assert accuracy(judge, held_out, held_labels) >= 0.95
    # and a judge of the wrong labels is not: accuracy measures agreement with the labels given
    assert accuracy(judge, held_out, 1 - held_labels) <= 0.05


def test_the_judge_is_deterministic_under_its_seed_and_resizes_any_input():
    images, labels = _toy(64, seed=0)
    a = train_judge(images, labels, steps=5, batch_size=16, width=4, size=16, seed=3)
    b = train_judge(images, labels, steps=5, batch_size=16, width=4, size=16, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    big = images.repeat(2, axis=1).repeat(2, axis=2)  # 32 px: resized to the judge's 16
    assert predict(a, big).shape == (64,)
