"""soupjax.importers.timm_export: our ViT -> a timm state dict, checked two ways.

Round trip: exporting then importing with `convert_timm_vit` gives back the identical tree.
Parity against an independent reference: a timm VisionTransformer built by hand (not from our
kwargs helper) loads the exported weights with strict=True and gives our Flax model's logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soupjax.models import get_model
from soupjax.importers.sources.timm import convert_timm_vit, load_timm_state_dict
from soupjax.io.trees import flatten
from soupjax.importers.timm_export import export_timm_vit, save_timm_state_dict, timm_vit_kwargs

KEY = jax.random.key(0, impl='rbg')
SMALL = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
# The same model as timm builds it: our defaults (LayerNorm eps 1e-6, exact GELU, qkv bias) are
# timm's, so only the shape is given.
TIMM_SMALL = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                  mlp_ratio=2.0, num_classes=5)


def _randomised(pooling: str) -> tuple[object, dict]:
    """Our small ViT on 28x28x1 images, 5 classes, with every parameter moved off its init.

    The init has zero cls token and head, unit LayerNorm scales and ~0 biases: a permuted or
    transposed one of those would go unnoticed. Noise of 0.05-0.3 makes every tensor count.
    """
    model = get_model('vit', 5, pooling=pooling, **SMALL)
    variables = jax.device_get(jax.jit(model.init)(KEY, jnp.zeros((1, 28, 28, 1))))
    rng = np.random.default_rng(0)

    def move(path, x):
        name = jax.tree_util.keystr(path)
        small = not any(part in name for part in ('scale', 'bias', 'cls', 'head'))
        scale = 0.05 if small else 0.3
        return (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(move, variables)


def _assert_trees_identical(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path in flat_a:
        x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.parametrize('pooling', ['token', 'gap'])
def test_round_trip(pooling):
    _, variables = _randomised(pooling)
    state = export_timm_vit(variables)
    assert ('cls_token' in state) == (pooling == 'token')
    _assert_trees_identical(convert_timm_vit(state, num_heads=SMALL['num_heads']), variables)


@pytest.mark.parametrize('ext', ['.pt', '.safetensors'])
def test_round_trip_through_a_file(tmp_path, ext):
    if ext == '.pt':
        pytest.importorskip('torch')
    _, variables = _randomised('token')
    path = save_timm_state_dict(variables, tmp_path / f'vit{ext}')  # variables are exported first
    state = load_timm_state_dict(path)
    _assert_trees_identical(convert_timm_vit(state, num_heads=SMALL['num_heads']), variables)


@pytest.mark.parametrize('pooling', ['token', 'gap'])
def test_timm_logits_match(pooling):
    timm = pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    model, variables = _randomised(pooling)
    images = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))

    kwargs = dict(TIMM_SMALL)
    if pooling == 'gap':  # LayerNorm over every token, then the mean: our 'gap' (no fc_norm)
        kwargs.update(class_token=False, global_pool='avg', fc_norm=False)
    assert timm_vit_kwargs(variables) == kwargs
    reference = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    state = export_timm_vit(variables)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        theirs = reference(nchw).numpy()

    diff = np.abs(ours - theirs).max()
    print(f'{pooling}: max |flax - timm| = {diff:.2e} (logits up to {np.abs(theirs).max():.2f})')
    assert np.abs(theirs).max() > 0.5, 'logits too small for the test to mean anything'
    assert diff < 1e-4

    # The bound is tight enough to catch a layout error: the same weights with query and key
    # swapped in block 0 give other logits.
    swapped = dict(state)
    q, k, v = np.split(state['blocks.0.attn.qkv.weight'], 3)
    swapped['blocks.0.attn.qkv.weight'] = np.concatenate([k, q, v])
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in swapped.items()}, strict=True)
    with torch.inference_mode():
        assert np.abs(reference(nchw).numpy() - ours).max() > 1e-3


def test_non_vit_trees_are_refused():
    resnet = get_model('resnet-testing', 5)
    variables = jax.eval_shape(resnet.init, KEY, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    with pytest.raises(ValueError, match='batch_stats'):
        export_timm_vit(variables)
    with pytest.raises(ValueError, match="'embedding/kernel' is missing"):
        export_timm_vit({'params': variables['params']})

    _, vit = _randomised('token')
    del vit['params']['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_1']['value']
    with pytest.raises(ValueError, match='encoderblock_1/MultiHeadDotProductAttention_1/value/kernel'):
        export_timm_vit(vit)

    _, vit = _randomised('token')
    vit['params']['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match='extra/kernel'):
        export_timm_vit(vit)
    with pytest.raises(ValueError, match='unknown format'):
        save_timm_state_dict(export_timm_vit(_randomised('token')[1]), 'vit.npz')
