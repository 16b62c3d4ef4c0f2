"""OpenAI's CLIP (Radford et al. 2021) as Flax linen modules: the image and text towers and the classifier
that model soups fine-tune.

`CLIPClassifier` is what soupjax fine-tunes: the image tower, named 'visual', and a Dense `head` applied
to the L2-normalised image features, as the official model-soups `ModelWrapper(normalize=True)` (its
zero-shot head carries CLIP's x100 logit scale in its weights; the model adds none). The text tower
(`CLIPTextEncoder`) builds zero-shot heads and is not part of an ingredient.

Parameter names follow open_clip's state dicts (torch '.' becomes '/'), so a reader can map keys:

    visual/conv1/kernel [p, p, 3, W]                 patch embedding, no bias (open_clip visual.conv1.weight)
    visual/class_embedding [W]
    visual/positional_embedding [1 + h*w, W]
    visual/ln_pre/{scale, bias}
    visual/transformer/resblocks_{i}/ln_1/{scale, bias}
    visual/transformer/resblocks_{i}/attn/{query, key, value}/{kernel [W, H, W/H], bias [H, W/H]}
    visual/transformer/resblocks_{i}/attn/out/{kernel [H, W/H, W], bias [W]}
    visual/transformer/resblocks_{i}/ln_2/{scale, bias}
    visual/transformer/resblocks_{i}/mlp/c_fc/{kernel [W, M], bias}, mlp/c_proj/{kernel [M, W], bias}
    visual/ln_post/{scale, bias}
    visual/proj [W, E]
    head/{kernel [E, C], bias [C]}                   CLIPClassifier only

    token_embedding/embedding [V, T]                 CLIPTextEncoder (its own tree, no prefix)
    positional_embedding [context_length, T]
    transformer/resblocks_{i}/...                    as the image tower's blocks, causal attention
    ln_final/{scale, bias}
    text_projection [T, E]

open_clip's fused `attn.in_proj_weight` [3W, W] is split into query/key/value per head, the layout of
soupjax.models.vit.SelfAttention, which is reused here (it is tuned for CPUs). LayerNorms use
epsilon 1e-5, PyTorch's default, which OpenAI, open_clip and transformers all train with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from soupjax.models.vit import SelfAttention

Dtype = Any

# The nonlinearity of the MLP blocks, as meta.json names it.
CLIP_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    # x * sigmoid(1.702 x): OpenAI's weights, and open_clip's '-quickgelu' models.
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    # torch's nn.GELU() (erf): open_clip's LAION-trained models without '-quickgelu'.
    'gelu_exact': lambda x: nn.gelu(x, approximate=False),
    # The tanh approximation (transformers' 'gelu_new' / 'gelu_pytorch_tanh').
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
}

LAYER_NORM_EPS = 1e-5

# The published sizes (OpenAI's model card; open_clip's model_configs ViT-B-32.json, ViT-B-16.json,
# ViT-L-14.json). Every one has MLPs 4x as wide as the blocks. 'clip-testing' is tiny, for tests.
CLIP_SIZES: dict[str, dict[str, Any]] = {
    'clip-vit-b/32': dict(
        embed_dim=512, image_size=224,
        vision=dict(patch_size=32, width=768, layers=12, heads=12),
        text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8)),
    'clip-vit-b/16': dict(
        embed_dim=512, image_size=224,
        vision=dict(patch_size=16, width=768, layers=12, heads=12),
        text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8)),
    'clip-vit-l/14': dict(
        embed_dim=768, image_size=224,
        vision=dict(patch_size=14, width=1024, layers=24, heads=16),
        text=dict(context_length=77, vocab_size=49408, width=768, layers=12, heads=12)),
    'clip-testing': dict(
        embed_dim=16, image_size=32,
        vision=dict(patch_size=8, width=32, layers=2, heads=2),
        text=dict(context_length=77, vocab_size=49408, width=32, layers=2, heads=2)),
}


def check_activation(name: str) -> None:
    """ValueError unless ``name`` is one of CLIP_ACTIVATIONS."""
    if name not in CLIP_ACTIVATIONS:
        raise ValueError(f'CLIP activation must be one of {sorted(CLIP_ACTIVATIONS)}, got {name!r}')


class CLIPMlp(nn.Module):
    """c_fc -> activation -> c_proj (open_clip's `mlp`); mlp_dim None is 4x the width."""

    mlp_dim: int | None = None
    activation: str = 'quick_gelu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim or 4 * width, dtype=self.dtype, name='c_fc')(x)
        x = CLIP_ACTIVATIONS[self.activation](x)
        return nn.Dense(width, dtype=self.dtype, name='c_proj')(x)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (open_clip's ResidualAttentionBlock)."""

    heads: int
    mlp_dim: int | None = None
    activation: str = 'quick_gelu'
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='ln_1')(x)
        x = x + SelfAttention(num_heads=self.heads, causal=self.causal, dtype=self.dtype,
                              name='attn')(y, deterministic=True)
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='ln_2')(x)
        return x + CLIPMlp(self.mlp_dim, self.activation, self.dtype, name='mlp')(y)


class Transformer(nn.Module):
    """The stack of blocks, `resblocks_{i}` (open_clip's transformer.resblocks.{i})."""

    layers: int
    heads: int
    mlp_dim: int | None = None
    activation: str = 'quick_gelu'
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.heads, self.mlp_dim, self.activation, self.causal,
                                       self.dtype, name=f'resblocks_{i}')(x)
        return x


class CLIPImageEncoder(nn.Module):
    """CLIP's image tower: `__call__(images NHWC, *, train)` -> float32 features [B, embed_dim], unnormalised.

    Attributes:
      patch_size, width, layers, heads: the ViT's shape; mlp_dim None is 4 * width.
      embed_dim: the width of the joint image-text space (`proj` maps width -> embed_dim).
      activation: one of CLIP_ACTIVATIONS, the checkpoint's (soupjax.importers.clip_checkpoint).
      dtype: computation dtype (jnp.bfloat16 on TPUs); parameters stay float32, features are float32.
    The position embedding is sized from the image seen at init (1 + (H/p)(W/p) rows), as the ViT's.
    """

    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    embed_dim: int = 512
    activation: str = 'quick_gelu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train  # CLIP has no dropout: the argument is there for soupjax's model interface
        check_activation(self.activation)
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f'image size {height}x{width} is not a multiple of patch size {p}')
        scale = self.width ** -0.5  # open_clip's init scale for the embeddings and the projection
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                    dtype=self.dtype, name='conv1')(images)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        cls = self.param('class_embedding', nn.initializers.normal(scale), (c,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
        pos = self.param('positional_embedding', nn.initializers.normal(scale), (1 + h * w, c))
        x = x + pos.astype(x.dtype)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='ln_pre')(x)
        x = Transformer(self.layers, self.heads, self.mlp_dim, self.activation, dtype=self.dtype,
                        name='transformer')(x)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='ln_post')(x[:, 0])
        proj = self.param('proj', nn.initializers.normal(scale), (self.width, self.embed_dim))
        return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower: `__call__(tokens int32 [B, L])` -> float32 features [B, embed_dim], unnormalised.

    L may be shorter than context_length (the first L position embeddings are used; with causal
    attention the features at the end-of-text token do not depend on what follows it).

    Attributes:
      context_length, vocab_size, width, layers, heads, mlp_dim, embed_dim, activation, dtype: as the
        image tower's.
      eos_token_id: where the features are read. None (default) is open_clip's and OpenAI's rule, the
        position of the largest token id (the end-of-text token is the last of the vocabulary, 49407);
        an id is transformers' rule, the first position holding it. The two agree whenever the
        end-of-text token is the largest id, as in CLIP's tokenizer.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int | None = None
    embed_dim: int = 512
    activation: str = 'quick_gelu'
    eos_token_id: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        check_activation(self.activation)
        length = tokens.shape[-1]
        if length > self.context_length:
            raise ValueError(f'{length} tokens, more than the context length {self.context_length}')
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='token_embedding')(tokens)
        pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                         (self.context_length, self.width))
        x = x + pos[:length].astype(x.dtype)
        x = Transformer(self.layers, self.heads, self.mlp_dim, self.activation, causal=True,
                        dtype=self.dtype, name='transformer')(x)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name='ln_final')(x)
        if self.eos_token_id is None:
            where = jnp.argmax(tokens, axis=-1)
        else:
            where = jnp.argmax(tokens == self.eos_token_id, axis=-1)
        x = x[jnp.arange(x.shape[0]), where]
        proj = self.param('text_projection', nn.initializers.normal(self.width ** -0.5),
                          (self.width, self.embed_dim))
        return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)


class CLIPClassifier(nn.Module):
    """CLIP's image tower and a linear head on its normalised features: `__call__(images NHWC, *, train)`
    -> float32 logits [B, num_classes].

    The official model-soups ModelWrapper(normalize=True): logits = head(f / |f|), f the image tower's
    features. Its params are {'visual': CLIPImageEncoder's, 'head': {'kernel' [E, C], 'bias' [C]}}.

    Attributes:
      num_classes: size of the head.
      patch_size, width, layers, heads, mlp_dim, embed_dim, activation, dtype: the image tower's.
      head_zero_init: zero kernel for the head (as soupjax's ViT), so a run with no head from a
        checkpoint or a zero-shot head starts from uniform predictions; False is PyTorch's Linear
        init, as the ModelWrapper (which the zero-shot head replaces there).
    """

    num_classes: int
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    embed_dim: int = 512
    activation: str = 'quick_gelu'
    head_zero_init: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        features = CLIPImageEncoder(
            patch_size=self.patch_size, width=self.width, layers=self.layers, heads=self.heads,
            mlp_dim=self.mlp_dim, embed_dim=self.embed_dim, activation=self.activation,
            dtype=self.dtype, name='visual')(images, train=train)
        features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
        # torch.nn.Linear's default init, kaiming_uniform(a=sqrt(5)): uniform(+-1/sqrt(fan_in)).
        kernel_init = (nn.initializers.zeros if self.head_zero_init
                       else nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                          name='head')(features.astype(self.dtype))
        return logits.astype(jnp.float32)


def image_encoder(size: str, **overrides: Any) -> CLIPImageEncoder:
    """The image tower of a CLIP_SIZES entry; ``overrides`` set any other field (activation, dtype)."""
    spec = _size(size)
    return CLIPImageEncoder(embed_dim=spec['embed_dim'], **{**spec['vision'], **overrides})


def text_encoder(size: str, **overrides: Any) -> CLIPTextEncoder:
    """The text tower of a CLIP_SIZES entry; ``overrides`` set any other field (activation, dtype)."""
    spec = _size(size)
    return CLIPTextEncoder(embed_dim=spec['embed_dim'], **{**spec['text'], **overrides})


def classifier(size: str, num_classes: int, **overrides: Any) -> CLIPClassifier:
    """The CLIPClassifier of a CLIP_SIZES entry with ``num_classes`` outputs."""
    spec = _size(size)
    return CLIPClassifier(num_classes=num_classes, embed_dim=spec['embed_dim'],
                          **{**spec['vision'], **overrides})


def _size(size: str) -> dict[str, Any]:
    key = size.lower()
    if key not in CLIP_SIZES:
        raise ValueError(f'unknown CLIP size {size!r}; known: {", ".join(CLIP_SIZES)}')
    return CLIP_SIZES[key]
