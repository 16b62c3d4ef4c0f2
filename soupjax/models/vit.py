"""Vision Transformer (Dosovitskiy et al. 2021) as a Flax linen module.

The parameter tree uses the names of google-research/vision_transformer (`models_vit.py`), so the
AugReg `.npz` checkpoints load without renaming, and `soupjax.importers.sources.timm` renames timm weights into
the same tree:

    embedding/{kernel [p, p, C, D], bias}            patch embedding (a strided conv)
    cls [1, 1, D]                                    class token (pooling='token' only)
    Transformer/posembed_input/pos_embedding [1, N, D]
    Transformer/encoderblock_{i}/LayerNorm_0
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}
    Transformer/encoderblock_{i}/LayerNorm_2
    Transformer/encoderblock_{i}/MlpBlock_3/{Dense_0,Dense_1}
    Transformer/encoder_norm
    pre_logits                                       only with representation_size
    head

The odd numbering (LayerNorm_0, MultiHeadDotProductAttention_1, ...) is inherited from the pre-linen
Flax auto-naming that the published checkpoints were saved with; it is set explicitly here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Widths of the standard sizes (Table 1 of the ViT paper; Ti and S from DeiT / AugReg).
VIT_SIZES: dict[str, dict[str, int]] = {
    'ti': dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    's': dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    'b': dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    'l': dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    'h': dict(hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
}

# A model small enough for unit tests to init, jit and run in a few seconds on one CPU core
# (as vision_transformer's `testing` config).
VIT_TESTING: dict[str, int] = dict(
    patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


class MlpBlock(nn.Module):
    """The transformer feed-forward block: Dense -> GELU -> Dropout -> Dense -> Dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        # Initialisers as vision_transformer, so that training from scratch behaves like it.
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, name=name,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6))
        out_dim = x.shape[-1]
        x = dense(self.mlp_dim, 'Dense_0')(x)
        x = nn.gelu(x, approximate=self.gelu_approximate)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        x = dense(out_dim, 'Dense_1')(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameters of Flax's ``MultiHeadDotProductAttention``.

    The same names and shapes (``query``/``key``/``value`` kernels [D, heads, D/heads], ``out`` kernel
    [heads, D/heads, D]) so that vision_transformer/big_vision checkpoints and our own ingredients load
    unchanged, and the same function (tests/test_models.py compares the two). Written out because it is
    faster where it matters to us, on CPUs (1.1-1.3x for the whole training step of the study's ViT on 2
    cores, docs/benchmarks.md): the softmax is normalised after the product with the values (a divide
    over [B, L, heads, D/heads] instead of over the [B, heads, L, L] scores, and no broadcast of the
    denominator that XLA's CPU backend materialises), and the max is a constant of the gradient.
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    # Each position attends to itself and the positions before it only (CLIP's text tower).
    causal: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
        head_dim = width // self.num_heads
        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
            name=name)
        query, key, value = dense('query')(x), dense('key')(x), dense('value')(x)  # [B, L, heads, hd]
        query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
        scores = jnp.einsum('bqhd,bkhd->bhqk', query, key).astype(jnp.float32)
        if self.causal:
            # -inf above the diagonal: exp gives 0 there, and the diagonal keeps every row's max finite.
            length = scores.shape[-1]
            scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
        # exp(s - max) / sum: the max only guards against overflow, so it carries no gradient.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        denominator = weights.sum(-1)  # [B, heads, L]
        if not deterministic and self.dropout_rate > 0:
            # Dropping unnormalised weights and normalising afterwards drops the same probabilities.
            keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.dropout_rate, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - self.dropout_rate), 0.0)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), value)
        out = out / jnp.swapaxes(denominator, 1, 2)[..., None].astype(out.dtype)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform(), name='out')(out)


class Encoder1DBlock(nn.Module):
    """A pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        # epsilon 1e-6 is Flax's LayerNorm default and what timm uses for ViT, so both agree.
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
        y = SelfAttention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
                          dtype=self.dtype, name='MultiHeadDotProductAttention_1')(y, deterministic=not train)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
        x = x + y

        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_2')(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                     gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                     name='MlpBlock_3')(y, train=train)
        return x + y


class AddPositionEmbs(nn.Module):
    """Adds a learned position embedding; its length is fixed by the input seen at init."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # Sized from the input, so a model initialised at 384px has a 384px grid. Applying it at
        # another resolution fails in Flax's shape check: resample with
        # soupjax.importers.posemb.resample_posemb instead.
        pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                         (1, x.shape[1], x.shape[2]))
        return x + pos.astype(x.dtype)


class Encoder(nn.Module):
    """Position embedding, the blocks and the final LayerNorm (module name `Transformer`)."""

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = AddPositionEmbs(name='posembed_input')(x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        for i in range(self.num_layers):
            x = Encoder1DBlock(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                name=f'encoderblock_{i}')(x, train=train)
        return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
    """ViT classifier: `__call__(images NHWC, *, train)` -> float32 logits [B, num_classes].

    Attributes:
      num_classes: size of the head.
      patch_size: side of the square patches; image height and width must be multiples of it.
      hidden_size, num_layers, num_heads, mlp_dim: the transformer's shape.
      pooling: 'token' (a learned class token, read out at position 0) or 'gap' (mean over the
        patch tokens after the final LayerNorm, no class token: vision_transformer's 'gap').
      dropout_rate, attention_dropout_rate: need the 'dropout' rng when train=True and > 0.
      representation_size: if set, a Dense+tanh `pre_logits` layer before the head (the i21k
        AugReg checkpoints of the original paper have one); None means none.
      gelu_approximate: the GELU of the MLP blocks. False (default) is the exact erf GELU, as
        PyTorch and timm compute it: timm checkpoints give timm's logits to float32 rounding, and
        models trained from scratch here use it. True is the tanh approximation (Flax's nn.gelu
        default), which vision_transformer and big_vision trained their .npz checkpoints with
        (AugReg included): with it our logits match vision_transformer's forward pass to float32
        rounding (tests/test_vit_reference.py); with the exact GELU they move by 4e-4 to 7e-4
        (the two differ by up to 4.7e-4 per activation). A config that fine-tunes from a
        checkpoint gets the checkpoint's GELU from soupjax.importers.activation.resolve_activation,
        which refuses a config asking for the other one unless init_from.allow_activation_mismatch.
      head_zero_init: zero kernel for the head, as vision_transformer: a fine-tuning run starts
        from uniform predictions and the pretrained features, whatever the seed.
      dtype: computation dtype (e.g. jnp.bfloat16 on TPU); parameters stay float32 and the
        logits are returned as float32.
    """

    num_classes: int
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pooling: str = 'token'
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    representation_size: int | None = None
    gelu_approximate: bool = False
    head_zero_init: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        if self.pooling not in ('token', 'gap'):
            raise ValueError(f"pooling must be 'token' or 'gap', got {self.pooling!r}")
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            # A VALID conv would silently drop the border; refuse instead.
            raise ValueError(f'image size {height}x{width} is not a multiple of patch size {p}')

        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                    dtype=self.dtype, name='embedding')(images)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))

        if self.pooling == 'token':
            # The class token is prepended before the position embedding is added (the
            # vision_transformer and timm convention), so pos_embedding has 1 + h*w rows.
            cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)

        x = Encoder(
            num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
            gelu_approximate=self.gelu_approximate, dtype=self.dtype,
            name='Transformer')(x, train=train)

        x = x[:, 0] if self.pooling == 'token' else jnp.mean(x, axis=1)

        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits')(x))

        head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init, name='head')(x)
        return x.astype(jnp.float32)
