"""Tests for soupjax.models: names, shapes, parameter names, BatchNorm and dropout behaviour.

Big models are only traced (jax.eval_shape), never run. Init keys use the 'rbg' PRNG: with the
default partitionable threefry, XLA on CPU spends seconds compiling each random initialiser.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soupjax.models import ResNet, build_model, build_model_from_run_config, get_model, list_models
from soupjax.io.trees import flatten

KEY = jax.random.key(0, impl='rbg')


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)


def _jit_apply(model, **kwargs):
    """model.apply under jit: one compile instead of one per op, which is slower on CPU."""
    return jax.jit(lambda variables, images, rngs=None: model.apply(
        variables, images, rngs=rngs, **kwargs))


def _num_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))


@pytest.fixture(scope='module')
def vit_testing():
    model = get_model('vit-testing', 10)
    logits, variables = jax.jit(model.init_with_output)(KEY, _images(16))
    return model, variables, logits


@pytest.fixture(scope='module')
def resnet_testing():
    model = get_model('resnet-testing', 10)
    return model, jax.jit(model.init)(KEY, _images(16))


# The parameter counts of the published models (timm / torchvision, 1000 classes) check that
# every named variant has the real architecture, without building it.
@pytest.mark.parametrize('name,size,count', [
    ('vit-ti/16', 224, 5_717_416),
    ('vit-s/16', 224, 22_050_664),
    ('ViT-B/32', 224, 88_224_232),
    ('vit-l/16', 224, 304_326_632),
    ('resnet18', 224, 11_689_512),
    ('resnet34', 224, 21_797_672),
    ('resnet50', 224, 25_557_032),
    ('resnet50d', 224, 25_576_264),
])
def test_named_variants_shapes_and_sizes(name, size, count):
    model = get_model(name, 1000)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    # One trace gives both the logits' and the variables' shapes; nothing is computed.
    logits, variables = jax.eval_shape(model.init_with_output, KEY, images)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert _num_params(variables) == count
    assert ('batch_stats' in variables) == name.startswith('resnet')


# The registry as documented (get_model's docstring, README): ViT (hidden, depth, heads, MLP, patch)
# and ResNet (blocks per stage, block kind) of the published architectures.
_VIT_SHAPES = {
    'vit-ti/16': (192, 12, 3, 768, 16), 'vit-s/16': (384, 12, 6, 1536, 16), 'vit-s/32': (384, 12, 6, 1536, 32),
    'vit-b/16': (768, 12, 12, 3072, 16), 'vit-b/32': (768, 12, 12, 3072, 32),
    'vit-l/16': (1024, 24, 16, 4096, 16), 'vit-l/32': (1024, 24, 16, 4096, 32),
    'vit-h/14': (1280, 32, 16, 5120, 14), 'vit-testing': (32, 2, 2, 64, 4), 'vit': (16, 1, 2, 32, 8),
}
_RESNET_SHAPES = {
    'resnet18': ((2, 2, 2, 2), 'basic'), 'resnet34': ((3, 4, 6, 3), 'basic'),
    'resnet50': ((3, 4, 6, 3), 'bottleneck'), 'resnet101': ((3, 4, 23, 3), 'bottleneck'),
    'resnet152': ((3, 8, 36, 3), 'bottleneck'), 'resnet50d': ((3, 4, 6, 3), 'bottleneck'),
    'resnet-testing': ((1, 1, 1, 1), 'basic'),
}


# CLIP image towers: (width, layers, heads, patch, embedding width), from OpenAI's model card.
_CLIP_SHAPES = {
    'clip-vit-b/32': (768, 12, 12, 32, 512), 'clip-vit-b/16': (768, 12, 12, 16, 512),
    'clip-vit-l/14': (1024, 24, 16, 14, 768), 'clip-testing': (32, 2, 2, 8, 16),
}


def test_every_listed_name_builds_its_architecture():
    assert sorted(list_models()) == sorted([*_VIT_SHAPES, *_RESNET_SHAPES, *_CLIP_SHAPES])
    assert len(set(list_models())) == len(list_models())
    for name in list_models():
        cfg = {}
        if name == 'vit':
            hidden, layers, heads, mlp, patch = _VIT_SHAPES['vit']
            cfg = dict(hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=mlp, patch_size=patch)
        model = get_model(name.upper(), 3, **cfg)  # names are case-insensitive
        if name in _CLIP_SHAPES:
            width, layers, heads, patch, embed = _CLIP_SHAPES[name]
            assert (model.width, model.layers, model.heads, model.patch_size, model.embed_dim) == _CLIP_SHAPES[name]
            shallow = get_model(name, 3, layers=1)
            images = jax.ShapeDtypeStruct((2, 2 * patch, 2 * patch, 3), jnp.float32)
            logits, variables = jax.eval_shape(shallow.init_with_output, KEY, images)
            assert (logits.shape, logits.dtype) == ((2, 3), jnp.float32), name
            flat = flatten(variables['params'])
            assert flat['visual/conv1/kernel'].shape == (patch, patch, 3, width), name
            assert flat['visual/transformer/resblocks_0/attn/query/kernel'].shape == (width, heads, width // heads)
            assert flat['visual/proj'].shape == (width, embed) and flat['head/kernel'].shape == (embed, 3), name
            continue
        if name in _VIT_SHAPES:
            assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim,
                    model.patch_size) == _VIT_SHAPES[name], name
            # Traced one block deep (tracing cost grows with depth; the depth is the field checked above,
            # and the full-depth variants are traced in test_named_variants_shapes_and_sizes).
            shallow, size = get_model(name, 3, **{**cfg, 'num_layers': 1}), 2 * model.patch_size
        else:
            assert (tuple(model.stage_sizes), model.block) == _RESNET_SHAPES[name], name
            shallow, size = get_model(name, 3, stage_sizes=(1, 1, 1, 1)), 32
        images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        logits, variables = jax.eval_shape(shallow.init_with_output, KEY, images)
        assert (logits.shape, logits.dtype) == ((2, 3), jnp.float32), name
        flat = flatten(variables['params'])
        if name in _VIT_SHAPES:
            hidden, _, heads, mlp, patch = _VIT_SHAPES[name]
            assert set(variables) == {'params'}, name
            assert flat['embedding/kernel'].shape == (patch, patch, 3, hidden), name
            block = 'Transformer/encoderblock_0/'
            assert flat[block + 'MultiHeadDotProductAttention_1/query/kernel'].shape == (
                hidden, heads, hidden // heads), name
            assert flat[block + 'MlpBlock_3/Dense_0/kernel'].shape == (hidden, mlp), name
            assert flat['head/kernel'].shape == (hidden, 3), name
        else:
            _, block = _RESNET_SHAPES[name]
            assert set(variables) == {'params', 'batch_stats'}, name
            assert ('stage1_block0/conv3/kernel' in flat) == (block == 'bottleneck'), name
            width = 8 if name == 'resnet-testing' else 64
            assert flat['head/kernel'].shape == (width * 8 * (4 if block == 'bottleneck' else 1), 3), name


def test_vit_patch_size_and_cfg_overrides():
    model = get_model('vit-b/8', 5, num_layers=1)
    assert (model.patch_size, model.hidden_size, model.num_layers) == (8, 768, 1)
    model = get_model('vit', 5, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, patch_size=8)
    assert model.hidden_size == 16


def test_dtype_from_a_config_string_is_checked():
    with pytest.raises(ValueError, match="dtype must be"):
        get_model('vit-testing', 3, dtype='bf16')


def test_bad_names_and_cfg():
    with pytest.raises(ValueError, match='unknown model'):
        get_model('vit-xl/16', 10)
    with pytest.raises(TypeError, match='unknown config keys'):
        get_model('resnet18', 10, hidden_size=3)
    with pytest.raises(ValueError, match='needs'):
        get_model('vit', 10, hidden_size=16)


VIT_BLOCK_PARAMS = [
    'LayerNorm_0/bias', 'LayerNorm_0/scale', 'LayerNorm_2/bias', 'LayerNorm_2/scale',
    'MlpBlock_3/Dense_0/bias', 'MlpBlock_3/Dense_0/kernel',
    'MlpBlock_3/Dense_1/bias', 'MlpBlock_3/Dense_1/kernel',
    *[f'MultiHeadDotProductAttention_1/{p}/{k}'
      for p in ('key', 'out', 'query', 'value') for k in ('bias', 'kernel')],
]


def test_vit_parameter_names_are_vision_transformers(vit_testing):
    _, variables, _ = vit_testing
    expected = {'cls', 'embedding/bias', 'embedding/kernel', 'head/bias', 'head/kernel',
                'Transformer/posembed_input/pos_embedding',
                'Transformer/encoder_norm/bias', 'Transformer/encoder_norm/scale',
                *[f'Transformer/encoderblock_{i}/{p}' for i in range(2) for p in VIT_BLOCK_PARAMS]}
    flat = flatten(variables['params'])
    assert set(variables) == {'params'}
    assert set(flat) == expected
    attn = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/'
    assert flat['embedding/kernel'].shape == (4, 4, 3, 32)
    assert flat[attn + 'query/kernel'].shape == (32, 2, 16)
    assert flat[attn + 'out/kernel'].shape == (2, 16, 32)
    assert flat['cls'].shape == (1, 1, 32)
    assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 1 + 16, 32)


def test_vit_head_zero_init_gives_zero_logits(vit_testing):
    _, _, logits = vit_testing
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, 0.0)  # zero head kernel and bias


def test_vit_token_vs_gap_and_representation():
    images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    gap = jax.eval_shape(get_model('vit-testing', 7, pooling='gap').init, KEY, images)['params']
    assert 'cls' not in gap
    assert gap['Transformer']['posembed_input']['pos_embedding'].shape == (1, 16, 32)
    rep = jax.eval_shape(get_model('vit-testing', 7, representation_size=24).init, KEY, images)
    assert rep['params']['pre_logits']['kernel'].shape == (32, 24)
    assert rep['params']['head']['kernel'].shape == (24, 7)
    with pytest.raises(ValueError, match='pooling'):
        jax.eval_shape(get_model('vit-testing', 7, pooling='map').init, KEY, images)


def test_vit_gap_runs_and_differs_from_token(vit_testing):
    # A gap model has the token model's parameters minus the class token and its position.
    _, variables, _ = vit_testing
    head = {'kernel': np.random.default_rng(0).standard_normal((32, 4), np.float32),
            'bias': np.zeros(4, np.float32)}
    token_params = {**variables['params'], 'head': head}
    gap_params = {k: v for k, v in token_params.items() if k != 'cls'}
    posemb = token_params['Transformer']['posembed_input']['pos_embedding']
    gap_params['Transformer'] = {**token_params['Transformer'],
                                 'posembed_input': {'pos_embedding': posemb[:, 1:]}}
    images = _images(16, seed=1)
    gap = _jit_apply(get_model('vit-testing', 4, pooling='gap'))({'params': gap_params}, images)
    token = _jit_apply(get_model('vit-testing', 4))({'params': token_params}, images)
    assert gap.shape == token.shape == (2, 4)
    assert np.all(np.isfinite(gap)) and not np.allclose(gap, token)


def test_vit_resolution_fixed_at_init():
    model = get_model('vit-testing', 3)
    variables = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 32, 24, 3), jnp.float32))
    assert variables['params']['Transformer']['posembed_input']['pos_embedding'].shape == (
        1, 1 + 8 * 6, 32)
    with pytest.raises(ValueError, match='not a multiple of patch size'):
        jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 30, 32, 3), jnp.float32))


def test_vit_dropout_needs_rng_in_train_only(vit_testing):
    _, variables, _ = vit_testing
    model = get_model('vit-testing', 10, dropout_rate=0.5, attention_dropout_rate=0.5,
                      head_zero_init=False)
    variables = {'params': {**variables['params'],
                            'head': {'kernel': jnp.ones((32, 10)), 'bias': jnp.zeros(10)}}}
    images = _images(16, seed=2)
    eval_logits = _jit_apply(model, train=False)(variables, images)  # no rng needed
    with pytest.raises(Exception, match='dropout'):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, images)
    train = _jit_apply(model, train=True)
    train_a = train(variables, images, {'dropout': jax.random.key(1, impl='rbg')})
    train_b = train(variables, images, {'dropout': jax.random.key(2, impl='rbg')})
    assert not np.allclose(train_a, eval_logits) and not np.allclose(train_a, train_b)


def test_self_attention_is_flax_multi_head_attention():
    """Our attention (normalised after the product with the values) has Flax's parameters and function,
    so checkpoints written with Flax's MultiHeadDotProductAttention load and give the same outputs."""
    import flax.linen as nn
    from soupjax.models.vit import SelfAttention
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 32), np.float32)) * 3.0
    ours, reference = SelfAttention(num_heads=4), nn.MultiHeadDotProductAttention(num_heads=4)
    variables = reference.init(jax.random.PRNGKey(0), x, x)
    assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x, deterministic=True))
            == jax.tree_util.tree_map(jnp.shape, variables))
    run_ours = lambda v: ours.apply(v, x, deterministic=True)  # noqa: E731
    run_reference = lambda v: reference.apply(v, x, x, deterministic=True)  # noqa: E731
    np.testing.assert_allclose(run_ours(variables), run_reference(variables), atol=2e-6, rtol=1e-5)
    # The gradients too: the max subtracted for stability carries none, as in a plain softmax.
    grad_ours = jax.grad(lambda v: jnp.sum(run_ours(v) ** 2))(variables)
    grad_reference = jax.grad(lambda v: jnp.sum(run_reference(v) ** 2))(variables)
    # Float32 rounding relative to the largest gradient (the key bias's is zero in exact arithmetic:
    # adding one number to a row of scores leaves its softmax unchanged).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad_reference))
    for a, b in zip(jax.tree_util.tree_leaves(grad_ours), jax.tree_util.tree_leaves(grad_reference)):
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=1e-4)


def test_self_attention_dropout_drops_attention_probabilities():
    """With every weight but the key's own dropped, each query attends to one value only."""
    from soupjax.models.vit import SelfAttention
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 8), np.float32))
    layer = SelfAttention(num_heads=1, dropout_rate=0.5)
    variables = layer.init(jax.random.PRNGKey(0), x, deterministic=True)
    a = layer.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
    b = layer.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
    c = layer.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(a, b)  # keyed: the same rng drops the same weights
    assert not np.allclose(a, c)
    # Rescaled by 1/(1-p) like any dropout: averaged over many keys, the output tends to the eval one.
    many = jnp.mean(jnp.stack([layer.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(k)})
                               for k in range(400)]), 0)
    np.testing.assert_allclose(many, c, atol=0.15)


def test_bfloat16_compute_returns_float32_logits():
    for name, dtype in (('vit-testing', jnp.bfloat16), ('resnet-testing', 'bfloat16')):  # a config's string too
        model = get_model(name, 3, dtype=dtype)
        assert model.dtype == jnp.bfloat16
        images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
        variables = jax.eval_shape(model.init, KEY, images)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
        assert jax.eval_shape(model.apply, variables, images).dtype == jnp.float32


def test_resnet_names_and_stems():
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = flatten(jax.eval_shape(get_model('resnet50d', 10).init, KEY, images)['params'])
    assert params['stem_conv_0/kernel'].shape == (3, 3, 3, 32)
    assert params['stem_conv_2/kernel'].shape == (3, 3, 32, 64)
    assert params['stage1_block0/conv3/kernel'].shape == (1, 1, 64, 256)
    assert params['stage2_block0/conv2/kernel'].shape == (3, 3, 128, 128)
    assert params['stage2_block0/downsample_conv/kernel'].shape == (1, 1, 256, 512)
    assert params['head/kernel'].shape == (2048, 10)
    params = flatten(jax.eval_shape(get_model('resnet18', 10).init, KEY, images)['params'])
    assert params['stem_conv/kernel'].shape == (7, 7, 3, 64)
    assert 'stage1_block0/downsample_conv/kernel' not in params  # 64 -> 64, stride 1
    assert params['stage4_block1/bn2/scale'].shape == (512,)
    cifar = get_model('resnet18', 10, stem='cifar', width=16)
    variables = jax.eval_shape(cifar.init, KEY, images)
    assert variables['params']['stem_conv']['kernel'].shape == (3, 3, 3, 16)
    feats = jax.eval_shape(lambda v, x: cifar.apply(v, x), variables, images)
    assert feats.shape == (1, 10)


def test_resnet_zero_init_last_bn(resnet_testing):
    _, variables = resnet_testing
    np.testing.assert_array_equal(variables['params']['stage1_block0']['bn2']['scale'], 0.0)
    np.testing.assert_array_equal(variables['params']['stage1_block0']['bn1']['scale'], 1.0)
    model = get_model('resnet-testing', 10, zero_init_last_bn=False)
    params = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert params['params']['stage1_block0']['bn2']['scale'].shape == (8,)


def test_resnet_batch_stats_update_in_train_and_are_used_in_eval(resnet_testing):
    model, variables = resnet_testing
    images = _images(16, batch=4, seed=3) * 3.0 + 1.0
    train = _jit_apply(model, train=True, mutable=['batch_stats'])
    evaluate = _jit_apply(model, train=False)
    logits, updates = train(variables, images)
    assert logits.shape == (4, 10)
    old, new = flatten(variables['batch_stats']), flatten(updates['batch_stats'])
    assert set(old) == set(new)
    assert all(not np.allclose(old[k], new[k]) for k in old), 'every BN must update its stats'
    # momentum 0.9 (PyTorch's 0.1): running = 0.9 * running + 0.1 * batch. A second step on the
    # same batch sees the same batch statistics, so from mean 0 it goes m, then 0.9 m + m.
    _, twice = train({'params': variables['params'], **updates}, images)
    twice = flatten(twice['batch_stats'])
    for k in old:
        if k.endswith('/mean'):
            np.testing.assert_allclose(twice[k], 1.9 * new[k], rtol=1e-4, atol=1e-6)

    # Eval uses the running statistics: changing them changes the logits, and an example's
    # logits do not depend on the rest of the batch (they do in train mode).
    head = {'kernel': np.random.default_rng(0).standard_normal((64, 10), np.float32),
            'bias': np.zeros(10, np.float32)}
    params = {**variables['params'], 'head': head}
    eval_vars = {'params': params, 'batch_stats': updates['batch_stats']}
    full = evaluate(eval_vars, images)
    # The same 4 images with the first alone in another batch: [first, first, first, first].
    alone = evaluate(eval_vars, np.repeat(images[:1], 4, axis=0))
    np.testing.assert_allclose(full[:1], alone[:1], atol=1e-5)
    train_full = train(eval_vars, images)[0]
    train_alone = train(eval_vars, np.repeat(images[:1], 4, axis=0))[0]
    assert not np.allclose(train_full[:1], train_alone[:1], atol=1e-5)
    shifted = jax.tree_util.tree_map(lambda x: x + 0.5, updates['batch_stats'])
    other = evaluate({'params': params, 'batch_stats': shifted}, images)
    assert not np.allclose(full, other)


@pytest.mark.parametrize('approximate', [False, True])
def test_vit_mlp_gelu_is_exact_by_default_and_tanh_when_asked(approximate):
    """The MLP block's nonlinearity: the exact erf GELU by default (timm, training from scratch),
    the tanh approximation (vision_transformer / big_vision .npz) with gelu_approximate=True."""
    from soupjax.models.vit import MlpBlock
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    block = MlpBlock(mlp_dim=16, gelu_approximate=True) if approximate else MlpBlock(mlp_dim=16)
    p = jax.tree_util.tree_map(np.asarray, block.init(KEY, x, train=False)['params'])
    # Pre-activations up to |4.5|, through |x| ~ 2.7 where the two GELUs differ most (4.7e-4).
    kernel = p['Dense_0']['kernel'] * 4.5 / np.abs(x @ p['Dense_0']['kernel']).max()
    p['Dense_0'] = {'kernel': kernel, 'bias': np.zeros(16, np.float32)}
    hidden = x @ kernel

    def mlp(gelu_approximate: bool) -> np.ndarray:
        gelu = np.asarray(jax.nn.gelu(hidden, approximate=gelu_approximate))
        return gelu @ p['Dense_1']['kernel'] + p['Dense_1']['bias']

    out = np.asarray(block.apply({'params': p}, x, train=False))
    np.testing.assert_allclose(out, mlp(approximate), rtol=1e-6, atol=1e-6)
    assert np.abs(out - mlp(not approximate)).max() > 1e-5  # the two are told apart at this scale


def test_vit_gelu_reaches_every_block_and_is_reported():
    from soupjax.models import activation, config_keys
    images = _images(16, batch=1)
    exact = get_model('vit-testing', 3, head_zero_init=False)
    tanh = get_model('vit-testing', 3, head_zero_init=False, gelu_approximate=True)
    assert exact.gelu_approximate is False  # from scratch: the exact GELU
    variables = jax.jit(exact.init)(KEY, images)
    assert not np.allclose(_jit_apply(exact)(variables, images), _jit_apply(tanh)(variables, images),
                           rtol=0, atol=1e-7)
    assert (activation(exact), activation(tanh)) == ('gelu_exact', 'gelu_tanh')
    assert activation(get_model('resnet-testing', 3)) == 'relu'
    assert 'gelu_approximate' in config_keys('vit-b/32') and 'gelu_approximate' in config_keys('vit')
    assert 'gelu_approximate' not in config_keys('resnet50d')
    with pytest.raises(ValueError, match='unknown model'):
        config_keys('vgg16')


def test_models_import_without_tensorflow():
    # The step benchmark builds models on accelerator hosts with JAX alone; build_model_from_run_config
    # imports soupjax.data (TensorFlow) only when it is called.
    code = "import sys, soupjax.models; assert 'tensorflow' not in sys.modules, 'soupjax.models imported tensorflow'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_model_from_a_config():
    from soupjax.config.base import base_config
    config = base_config()
    config.model = {'name': 'resnet-testing'}
    config.data.classes = [0, 3, 7]  # the head's width, without reading any data
    model = build_model_from_run_config(config)
    assert isinstance(model, ResNet) and model.num_classes == 3
    assert build_model(config.model, 3, 'relu') == model
    with pytest.raises(ValueError, match='runs relu'):
        build_model(config.model, 3, 'gelu_tanh')


def test_building_a_model_reads_no_file(tmp_path, monkeypatch):
    """The model is (model config, class count, activation) alone: init_from is never opened, nor looked
    at (an .npz name once made build_model pick the tanh GELU itself)."""
    import builtins
    import io
    import os

    from soupjax.config.base import base_config
    config = base_config()
    config.model = {'name': 'vit-testing'}
    config.data.classes = [1, 2]
    config.init_from.path = str(tmp_path / 'missing' / 'ViT-B_16.npz')
    # An upstream ingredient whose meta.json says tanh: not read either.
    (tmp_path / 'up' / 'variables').mkdir(parents=True)
    (tmp_path / 'up' / 'meta.json').write_text('{"activation": "gelu_tanh", "config": {}}')

    def refuse(*args, **kwargs):
        raise AssertionError(f'a file was opened while building a model: {args[:1]}')

    build_model_from_run_config(config)  # imports soupjax.data (TensorFlow) before files are refused
    for owner, name in ((builtins, 'open'), (io, 'open'), (os, 'open'), (os, 'stat'), (os, 'listdir')):
        monkeypatch.setattr(owner, name, refuse)
    for path in (config.init_from.path, str(tmp_path / 'up')):
        config.init_from.path = path
        model = build_model_from_run_config(config)
        assert model.gelu_approximate is False and model.num_classes == 2  # the config's own field
        assert build_model_from_run_config(config, 'gelu_tanh').gelu_approximate is True
    monkeypatch.undo()


def test_build_model_takes_the_recorded_activation():
    vit = {'name': 'vit-testing'}
    assert build_model(vit, 4).gelu_approximate is False  # none recorded: the config's own (default)
    assert build_model(vit, 4, 'gelu_tanh').gelu_approximate is True
    assert build_model({**vit, 'gelu_approximate': True}, 4).gelu_approximate is True
    assert build_model({**vit, 'gelu_approximate': True}, 4, 'gelu_tanh').gelu_approximate is True
    with pytest.raises(ValueError, match='contradicts'):  # a meta.json edited by hand
        build_model({**vit, 'gelu_approximate': False}, 4, 'gelu_tanh')
    with pytest.raises(ValueError, match='runs a GELU'):
        build_model(vit, 4, 'relu')
    with pytest.raises(ValueError, match='activation must be one of'):
        build_model(vit, 4, 'swish')
