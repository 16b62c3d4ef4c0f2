"""ResNets with BatchNorm (He et al. 2016) as Flax linen modules: v1.5 and the "d" variant.

v1.5 (torchvision's and timm's `resnet50`) puts the stride of a bottleneck on its 3x3 conv. The
"d" variant (Bag of Tricks, He et al. 2019; timm's `resnet50d`) adds a deep stem of three 3x3
convs (widths width/2, width/2, width) and downsamples the shortcut with a 2x2 average pool before
a stride-1 1x1 conv. Convolutions pad symmetrically, as PyTorch, so timm weights give timm's
logits (Flax's 'SAME' would pad (0, 1) for stride 2 on even inputs).

Parameter tree (timm name -> ours), chosen so that the converter is a plain renaming:

    conv1 / bn1                      -> stem_conv / stem_bn               ('imagenet', 'cifar')
    conv1.{0,3,6} / conv1.{1,4}, bn1 -> stem_conv_{0,1,2} / stem_bn_{0,1,2}  ('deep')
    layer{i}.{j}.conv{k} / bn{k}     -> stage{i}_block{j}/conv{k} / bn{k}   (i from 1, j from 0)
    layer{i}.{j}.downsample conv/bn  -> stage{i}_block{j}/downsample_conv / downsample_bn
    fc                               -> head

Convs have a `kernel` only; BatchNorms have params `scale`, `bias` and batch_stats `mean`, `var`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from soupjax.models.initializers import he_normal_fan_out

Dtype = Any

# He-normal on fan_out, as torchvision and timm initialise their convs: Flax's values, drawn flat so
# that the init compiles 2-3x faster (models/initializers.py).
_conv_init = he_normal_fan_out()


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    """A bias-free conv with PyTorch's symmetric padding (kernel // 2 on every side)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=_conv_init, dtype=dtype, name=name)


class _BlockBase(nn.Module):
    """Fields and helpers shared by the basic and the bottleneck block."""

    planes: int
    stride: int = 1
    avg_down: bool = False
    bn_momentum: float = 0.9
    zero_init_last_bn: bool = True
    dtype: Dtype = jnp.float32

    def _bn(self, name: str, train: bool, last: bool = False) -> nn.BatchNorm:
        # Flax's momentum is the weight of the old running value: 0.9 here is PyTorch's 0.1.
        # Zero-init of the last BN makes each block start as the identity (Goyal et al. 2017).
        scale_init = (nn.initializers.zeros if last and self.zero_init_last_bn
                      else nn.initializers.ones)
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=1e-5, scale_init=scale_init, dtype=self.dtype, name=name)

    def _shortcut(self, x: jnp.ndarray, out_ch: int, train: bool) -> jnp.ndarray:
        if self.stride == 1 and x.shape[-1] == out_ch:
            return x
        if self.avg_down:
            if self.stride != 1:
                # timm: AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False). Padding odd
                # sides by one, excluded from the mean, gives the same ceil-mode windows.
                h, w = x.shape[1:3]
                x = nn.avg_pool(x, (2, 2), strides=(self.stride, self.stride),
                                padding=((0, h % 2), (0, w % 2)), count_include_pad=False)
            x = _conv(out_ch, 1, 1, 'downsample_conv', self.dtype)(x)
        else:
            x = _conv(out_ch, 1, self.stride, 'downsample_conv', self.dtype)(x)
        return self._bn('downsample_bn', train)(x)


class BasicBlock(_BlockBase):
    """Two 3x3 convs (ResNet-18/34); the first carries the stride."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        out_ch = self.planes * self.expansion
        y = _conv(self.planes, 3, self.stride, 'conv1', self.dtype)(x)
        y = nn.relu(self._bn('bn1', train)(y))
        y = _conv(out_ch, 3, 1, 'conv2', self.dtype)(y)
        y = self._bn('bn2', train, last=True)(y)
        return nn.relu(y + self._shortcut(x, out_ch, train))


class BottleneckBlock(_BlockBase):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4 (ResNet-50 and deeper)."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        out_ch = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, 'conv1', self.dtype)(x)
        y = nn.relu(self._bn('bn1', train)(y))
        y = _conv(self.planes, 3, self.stride, 'conv2', self.dtype)(y)
        y = nn.relu(self._bn('bn2', train)(y))
        y = _conv(out_ch, 1, 1, 'conv3', self.dtype)(y)
        y = self._bn('bn3', train, last=True)(y)
        return nn.relu(y + self._shortcut(x, out_ch, train))


BLOCKS: dict[str, type[_BlockBase]] = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}

# name -> ResNet fields. The "d" models differ only in stem and shortcut.
RESNET_CONFIGS: dict[str, dict[str, Any]] = {
    'resnet18': dict(stage_sizes=(2, 2, 2, 2), block='basic'),
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), block='basic'),
    'resnet50': dict(stage_sizes=(3, 4, 6, 3), block='bottleneck'),
    'resnet101': dict(stage_sizes=(3, 4, 23, 3), block='bottleneck'),
    'resnet152': dict(stage_sizes=(3, 8, 36, 3), block='bottleneck'),
    'resnet50d': dict(stage_sizes=(3, 4, 6, 3), block='bottleneck', stem='deep', avg_down=True),
    # Seconds on a CPU: one basic block per stage, width 8, no stem downsampling.
    'resnet-testing': dict(stage_sizes=(1, 1, 1, 1), block='basic', width=8, stem='cifar'),
}


class ResNet(nn.Module):
    """ResNet classifier: `__call__(images NHWC, *, train)` -> float32 logits [B, num_classes].

    With train=True BatchNorm normalises with batch statistics and updates `batch_stats`
    (pass mutable=['batch_stats']); with train=False it uses the running statistics.

    Attributes:
      num_classes: size of the head.
      stage_sizes: blocks per stage (4 stages, strides 1, 2, 2, 2).
      block: 'basic' or 'bottleneck'.
      width: channels of the first stage's 3x3 convs (64 for the standard models); stage i has
        width * 2**i, times 4 at a bottleneck's output.
      stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool), 'deep' (three 3x3 convs, the first with
        stride 2, + max pool) or 'cifar' (one 3x3/1 conv, no pool: for 32px images).
      avg_down: average-pool downsampling in the shortcut (the "d" variant).
      bn_momentum: Flax convention, weight of the old running value; 0.9 = PyTorch's 0.1.
      zero_init_last_bn: zero the scale of each block's last BN, as timm's default.
      dtype: computation dtype; parameters and the returned logits are float32.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = 'bottleneck'
    width: int = 64
    stem: str = 'imagenet'
    avg_down: bool = False
    bn_momentum: float = 0.9
    zero_init_last_bn: bool = True
    dtype: Dtype = jnp.float32

    def _stem_bn(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=1e-5, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        if self.block not in BLOCKS:
            raise ValueError(f'block must be one of {sorted(BLOCKS)}, got {self.block!r}')
        x = images.astype(self.dtype)
        if self.stem == 'imagenet':
            x = _conv(self.width, 7, 2, 'stem_conv', self.dtype)(x)
            x = nn.relu(self._stem_bn('stem_bn', train)(x))
        elif self.stem == 'deep':
            for i, (features, stride) in enumerate(
                    [(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)]):
                x = _conv(features, 3, stride, f'stem_conv_{i}', self.dtype)(x)
                x = nn.relu(self._stem_bn(f'stem_bn_{i}', train)(x))
        elif self.stem == 'cifar':
            x = _conv(self.width, 3, 1, 'stem_conv', self.dtype)(x)
            x = nn.relu(self._stem_bn('stem_bn', train)(x))
        else:
            raise ValueError(f"stem must be 'imagenet', 'deep' or 'cifar', got {self.stem!r}")
        if self.stem != 'cifar':
            # Padding with -inf (Flax's max_pool does) equals PyTorch's MaxPool2d(3, 2, padding=1).
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_cls = BLOCKS[self.block]
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block_cls(
                    planes=self.width * 2**i,
                    stride=2 if i > 0 and j == 0 else 1,
                    avg_down=self.avg_down, bn_momentum=self.bn_momentum,
                    zero_init_last_bn=self.zero_init_last_bn, dtype=self.dtype,
                    name=f'stage{i + 1}_block{j}')(x, train=train)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
        return x.astype(jnp.float32)
