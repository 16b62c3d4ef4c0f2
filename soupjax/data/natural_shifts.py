"""The paper's natural distribution shifts, as TFDS data sets, and the 200-class projections.

For a model fine-tuned on ImageNet the paper reports ImageNet-V2, -R, -Sketch, -A (and ObjectNet, which
TFDS does not have); for CIFAR-10, CIFAR-10.1 and CIFAR-10-C. Each split name here maps to a TFDS builder
and split. They are downloaded (`download=True`) or prepared like any TFDS data set.

ImageNet-R and ImageNet-A cover 200 of the 1,000 classes. TFDS labels them in the 1,000-class ImageNet
index space (ClassLabel over `imagenet2012/labels.txt`, the sorted WordNet ids). As in the official
model-soups / WiSE-FT code, evaluation keeps only the logits of those 200 classes, `logits[:, idx]` with
`idx = projection(split)` (sorted), and the labels become positions in `idx`, 0..199; `pipeline.py` does
that relabelling, so `argmax(logits[:, idx]) == label` is a correct prediction.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a natural shift split lives in TFDS."""
    builder: str                          # TFDS name, with config: 'imagenet_v2/matched-frequency'
    split: str = "test"
    classes: tuple[int, ...] | None = None  # label subset, in the original label space (ImageNet-R/-A)


# ImageNet class indices of ImageNet-R's 200 classes (mlfoundations/wise-ft, src/datasets/imagenet_r.py).
IMAGENET_R_CLASSES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100,
    105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172,
    178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260,
    263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314,
    315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367,
    368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462,
    463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609,
    613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815,
    820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945,
    947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988)

# ImageNet class indices of ImageNet-A's 200 classes (mlfoundations/wise-ft, src/datasets/imagenet_a.py).
IMAGENET_A_CLASSES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99,
    105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287,
    291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330,
    334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425,
    428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530,
    539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765,
    768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839,
    845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943,
    945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988)

# The natural shift sets of each data set (TFDS name without config), in the order they are reported.
NATURAL = {
    "imagenet2012": {
        "imagenet_v2": Source("imagenet_v2/matched-frequency"),
        "imagenet_r": Source("imagenet_r", classes=IMAGENET_R_CLASSES),
        "imagenet_sketch": Source("imagenet_sketch"),
        "imagenet_a": Source("imagenet_a", classes=IMAGENET_A_CLASSES),
    },
    "cifar10": {
        "cifar10_1": Source("cifar10_1/v6"),
    },
}

# CIFAR-10-C, 'cifar10_corrupted/<corruption>_<severity>' (the TFDS builder configs).
CIFAR10_CORRUPTED_PREFIX = "cifar10_corrupted/"
CIFAR10_CORRUPTIONS = (
    "brightness", "contrast", "defocus_blur", "elastic", "fog", "frost", "frosted_glass_blur",
    "gaussian_blur", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate",
    "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur")


def base_name(dataset: str) -> str:
    """'imagenet2012/5.1.0' or 'cifar10:3.0.2' -> the TFDS name the natural sets are filed under."""
    return dataset.split("/")[0].split(":")[0]


def splits_for(dataset: str) -> list[str]:
    """Every natural shift split name that belongs to `dataset` (CIFAR-10-C included for CIFAR-10)."""
    names = list(NATURAL.get(base_name(dataset), {}))
    if base_name(dataset) == "cifar10":
        names += [f"{CIFAR10_CORRUPTED_PREFIX}{c}_{s}" for c in CIFAR10_CORRUPTIONS for s in range(1, 6)]
    return names


def default_splits(dataset: str) -> list[str]:
    """The natural sets reported by default: all but CIFAR-10-C (95 sets; name the ones you want)."""
    return list(NATURAL.get(base_name(dataset), {}))


def source(dataset: str, split: str) -> Source | None:
    """The TFDS source of natural shift `split` for `dataset`, or None if it isn't one of its splits."""
    natural = NATURAL.get(base_name(dataset), {})
    if split in natural:
        return natural[split]
    if base_name(dataset) == "cifar10" and split.startswith(CIFAR10_CORRUPTED_PREFIX):
        corruption, _, severity = split[len(CIFAR10_CORRUPTED_PREFIX):].rpartition("_")
        if corruption in CIFAR10_CORRUPTIONS and severity in {"1", "2", "3", "4", "5"}:
            return Source(split)
    return None


def projection(dataset: str, split: str) -> np.ndarray | None:
    """Sorted indices of the logits to keep for `split` (ImageNet-R/-A: their 200 classes), else None."""
    src = source(dataset, split)
    if src is None or src.classes is None:
        return None
    return np.asarray(src.classes, np.int32)
