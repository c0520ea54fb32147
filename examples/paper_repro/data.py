"""Digits-on-a-canvas VQA: scikit-learn's 8x8 digits on a blank canvas plus a short question.

Each example is one digit (pixel values 0..16, scaled to [0, 1]) pasted at a random position
on a blank ``canvas x canvas`` image, cut into ``patch x patch`` patches (the image tokens;
most of them blank), a 6-word question (the text tokens) and an answer class. By default the
position is random on the patch grid (24x24 canvas, 4x4 patches: 5x5 positions, the digit
covers 4 of 36 patches); with ``place_step=1`` it is random to the pixel, which our tiny
transformer did not learn to read within the study's CPU budget (it stayed at the
text-only prior).

    q0 "what digit is shown here ?"     -> the digit (classes 0..9)
    q1 "is the shown digit even ?"      -> no / yes  (classes 10 / 11)
    q2 "is the digit above <n> ?"       -> no / yes, n in 0..8
    q3 "is this digit a <n> ?"          -> no / yes, n = the digit half of the time

The patch's *ink* (sum of its clean pixel values) is kept for the analysis; a patch is
foreground when its ink is > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["<cls>"]
WORDS = ["what", "digit", "is", "shown", "here", "?", "the", "even", "above", "this", "a"]
VOCAB = SPECIALS + WORDS + NUMBER_WORDS
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
TEMPLATES = [
    "what digit is shown here ?",
    "is the shown digit even ?",
    "is the digit above {n} ?",
    "is this digit a {n} ?",
]
QUESTION_NAMES = ["which", "even", "above", "is_a"]
TEXT_LEN = 6
NUM_CLASSES = 12          # 0..9 digits, 10 = no, 11 = yes
NO, YES = 10, 11
# modality ids of the tokens (the layer's per-modality statistics)
IMAGE, TEXT, CLS = 0, 1, 2
MODALITY_NAMES = ["image", "text", "cls"]


def encode(words: list[str]) -> list[int]:
    assert len(words) == TEXT_LEN, words
    return [WORD_ID[w] for w in words]


def question(qtype: int, digit: int, n: int) -> tuple[list[int], int]:
    """(token ids, answer class) of question type ``qtype`` about ``digit``."""
    words = TEMPLATES[qtype].format(n=NUMBER_WORDS[n]).split()
    if qtype == 0:
        ans = digit
    elif qtype == 1:
        ans = YES if digit % 2 == 0 else NO
    elif qtype == 2:
        ans = YES if digit > n else NO
    else:
        ans = YES if digit == n else NO
    return encode(words), ans


def load_digits_split(test_fraction: float = 0.22, seed: int = 0):
    """(train images [n,8,8] float in [0,1], train labels, test images, test labels)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = d.images.astype(np.float32) / 16.0
    labels = d.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    te, tr = perm[:n_test], perm[n_test:]
    return (torch.from_numpy(imgs[tr]), torch.from_numpy(labels[tr]),
            torch.from_numpy(imgs[te]), torch.from_numpy(labels[te]))


@dataclass
class Batch:
    patches: torch.Tensor   # [B, P, patch*patch] float
    ink: torch.Tensor       # [B, P] float: clean ink per patch
    canvas: torch.Tensor    # [B, C, C] float (for the figures)
    text: torch.Tensor      # [B, TEXT_LEN] int64
    qtype: torch.Tensor     # [B] int64
    answer: torch.Tensor    # [B] int64
    digit: torch.Tensor     # [B] int64


class CanvasDigits:
    """Generates batches; all randomness from the given torch.Generator (fixed seeds)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, canvas: int = 24,
                 patch: int = 4, noise: float = 0.0, place_step: int | None = None):
        assert canvas % patch == 0 and canvas >= 8
        self.images, self.labels = images, labels
        self.canvas, self.patch, self.noise = canvas, patch, noise
        # the digit's corner lies on multiples of place_step (default: the patch size, so a
        # digit covers exactly 2x2 patches; 1 = anywhere: did not train within the budget)
        self.place_step = patch if place_step is None else place_step
        self.grid = canvas // patch
        self.num_patches = self.grid ** 2

    def _cut(self, img: torch.Tensor) -> torch.Tensor:
        B, p, g = img.shape[0], self.patch, self.grid
        return (img.reshape(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p))

    def make(self, idx: torch.Tensor, qtype: torch.Tensor, gen: torch.Generator) -> Batch:
        B, C = len(idx), self.canvas
        canvas = torch.zeros(B, C, C)
        pos = torch.randint(0, (C - 8) // self.place_step + 1, (B, 2),
                            generator=gen) * self.place_step
        for b in range(B):
            r, c = int(pos[b, 0]), int(pos[b, 1])
            canvas[b, r:r + 8, c:c + 8] = self.images[idx[b]]
        ink = self._cut(canvas).sum(-1)
        seen = canvas
        if self.noise > 0:
            seen = canvas + self.noise * torch.randn(canvas.shape, generator=gen)
        digit = self.labels[idx]
        # q2: n uniform in 0..8; q3: n = digit half of the time, else another digit
        n_above = torch.randint(0, 9, (B,), generator=gen)
        other = (digit + torch.randint(1, 10, (B,), generator=gen)) % 10
        same = torch.rand(B, generator=gen) < 0.5
        n_isa = torch.where(same, digit, other)
        text, ans = [], []
        for b in range(B):
            q = int(qtype[b])
            n = int(n_above[b]) if q == 2 else int(n_isa[b])
            t, a = question(q, int(digit[b]), n)
            text.append(t)
            ans.append(a)
        return Batch(self._cut(seen), ink, canvas, torch.tensor(text), qtype.clone(),
                     torch.tensor(ans), digit)

    def sample(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=gen)
        qtype = torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)
        return self.make(idx, qtype, gen)

    def fixed_eval(self, seed: int, limit: int | None = None) -> Batch:
        """Every image (or the first ``limit``) with each of the question types, at
        positions drawn from ``seed``: the same set for every model."""
        gen = torch.Generator().manual_seed(seed)
        n = len(self.labels) if limit is None else min(limit, len(self.labels))
        nq = len(TEMPLATES)
        idx = torch.arange(n).repeat_interleave(nq)
        qtype = torch.arange(nq).repeat(n)
        return self.make(idx, qtype, gen)


def slice_batch(b: Batch, s: slice) -> Batch:
    return Batch(*(getattr(b, f)[s] for f in Batch.__dataclass_fields__))
