"""Tests for soupjax.importers (dispatch, sources, merge, posemb, fingerprint), against independent references.

timm checkpoints: a randomly initialised timm model (pretrained=False, no network) is saved,
converted, and must give timm's logits. .npz checkpoints: files written with np.savez from our own
init, with vision_transformer and big_vision names. Big models are checked by shapes only.
"""

from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # never reach the Hub, even by accident

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soupjax.models import get_model
from soupjax.importers.dispatch import load_pretrained
from soupjax.importers.fingerprint import weights_fingerprint as fingerprint
from soupjax.importers.merge import PretrainedMismatchError, merge_params
from soupjax.importers.posemb import resample_posemb, resize_weights
from soupjax.importers.sources.npz import load_npz
from soupjax.importers.sources.timm import convert_timm_resnet, convert_timm_vit, load_timm_state_dict
from soupjax.io.trees import flatten, unflatten

# 'rbg' keys: partitionable threefry takes seconds of XLA compile per initialiser on CPU.
KEY = jax.random.key(0, impl='rbg')
POSEMB = 'Transformer/posembed_input/pos_embedding'


def _nchw_images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)


def _assert_trees_equal(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert set(flat_a) == set(flat_b)
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]),
                                      err_msg=path)


@pytest.fixture(scope='module')
def vit_init():
    """A real 'vit-testing' init at 16px with a non-zero head, 10 classes."""
    model = get_model('vit-testing', 10, head_zero_init=False)
    return jax.jit(model.init)(KEY, np.zeros((1, 16, 16, 3), np.float32))


def _save_npz(path, params, prefix=''):
    np.savez(path, **{prefix + k: np.asarray(v) for k, v in flatten(params).items()})
    return path


# ---------------------------------------------------------------------------------------------
# timm parity


def _randomise(model, torch) -> None:
    """Moves every parameter and BN statistic off its init, so that all of them are tested."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                # Includes the zero-initialised last BN of each block; kept < 1 so that the
                # logits stay O(1) through 16 residual blocks.
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        for name, param in model.named_parameters():
            if name.startswith(('head', 'fc', 'cls_token')) or name.endswith('.bias'):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)


@pytest.mark.parametrize('timm_name,ours,size,ext', [
    ('vit_tiny_patch16_224', 'vit-ti/16', 224, '.safetensors'),
    ('resnet18', 'resnet18', 56, '.pth'),
    # 48px gives odd feature maps (3x3 before stage 4): tests ceil-mode average-pool downsampling.
    ('resnet50d', 'resnet50d', 48, '.safetensors'),
])
def test_timm_parity(tmp_path, timm_name, ours, size, ext):
    timm = pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).eval()
    _randomise(reference, torch)
    images = _nchw_images(size)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()

    path = tmp_path / f'{timm_name}{ext}'
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if ext == '.safetensors':
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)

    model = get_model(ours, 1000)
    nhwc = images.transpose(0, 2, 3, 1)
    # Abstract init: nothing is kept from it (the head fits, so the default dont_load loads it).
    abstract = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(nhwc.shape, jnp.float32))
    variables = load_pretrained(path, abstract)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)

    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc))
    diff = np.abs(logits - expected).max()
    scale = np.abs(expected).max()
    print(f'{timm_name}: max |flax - timm| = {diff:.2e} (logits up to {scale:.2f})')
    assert scale > 0.5, 'logits too small for the test to mean anything'
    assert diff < 1e-4


def _meta_state_dict(timm, torch, name):
    """Shapes of a timm model's state dict as zero-stride numpy arrays: no memory, no weights."""
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False)
    return {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize('timm_name,ours', [
    ('vit_base_patch32_224', 'vit-b/32'),
    ('vit_large_patch16_224', 'vit-l/16'),
    ('resnet34', 'resnet34'),
    ('resnet50', 'resnet50'),
])
def test_timm_conversion_shapes_for_big_models(timm_name, ours):
    timm = pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    state = _meta_state_dict(timm, torch, timm_name)
    model = get_model(ours, 1000)
    abstract = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    heads = model.num_heads if ours.startswith('vit') else None
    converted = (convert_timm_vit(state, num_heads=heads) if heads else convert_timm_resnet(state))
    shapes = lambda tree: {k: tuple(v.shape) for k, v in flatten(tree).items()}  # noqa: E731
    assert shapes(converted) == shapes(abstract)


def test_timm_unsupported_features_raise():
    timm = pytest.importorskip('timm')
    # LayerScale (init_values) has no place in the vision_transformer tree: refuse, naming it.
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, init_values=1e-5)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match='ls1.gamma'):
        convert_timm_vit(state, num_heads=2)


def test_load_timm_state_dict_unwraps_training_checkpoints(tmp_path):
    torch = pytest.importorskip('torch')
    path = tmp_path / 'ckpt.pt'
    torch.save({'state_dict': {'module.fc.weight': torch.ones(2, 3, dtype=torch.bfloat16)},
                'epoch': 3}, path)
    state = load_timm_state_dict(path)
    assert list(state) == ['fc.weight']
    assert state['fc.weight'].dtype == np.float32 and state['fc.weight'].shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# vision_transformer / big_vision .npz


def test_npz_round_trip(tmp_path, vit_init):
    path = _save_npz(tmp_path / 'vit.npz', vit_init['params'])
    _assert_trees_equal(load_npz(path), vit_init['params'])
    loaded = load_pretrained(path, vit_init)
    _assert_trees_equal(loaded, vit_init)  # the head fits, so it is loaded, not re-initialised
    assert fingerprint(loaded) == fingerprint(vit_init)


def test_big_vision_npz_names(tmp_path, vit_init):
    """big_vision: 'params/' prefix, top-level pos_embedding without the class token's row,
    MultiHeadDotProductAttention_0 / LayerNorm_1 / MlpBlock_0, layers stacked by nn.scan."""
    flat = {k: np.array(v) for k, v in flatten(vit_init['params']).items()}
    flat[POSEMB][:, 0] = 0.0  # big_vision adds no position embedding to the class token
    expected = unflatten(flat)
    renames = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
               'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
    bv = {'pos_embedding': flat.pop(POSEMB)[:, 1:]}
    stacked: dict[str, list] = {}
    for path, value in flat.items():
        parts = path.split('/')
        if parts[1:2] and parts[1].startswith('encoderblock_'):
            rest = '/'.join([renames.get(parts[2], parts[2]), *parts[3:]])
            stacked.setdefault(f'Transformer/encoderblock/{rest}', []).append(value)
        else:
            bv[path] = value
    bv.update({k: np.stack(v) for k, v in stacked.items()})
    path = tmp_path / 'bv.npz'
    np.savez(path, **{f'params/{k}': v for k, v in bv.items()}, **{'opt/step': np.array(3)})
    _assert_trees_equal(load_npz(path), expected)


def test_npz_posemb_is_resampled_to_the_model_resolution(tmp_path, vit_init):
    path = _save_npz(tmp_path / 'vit16.npz', vit_init['params'])
    model = get_model('vit-testing', 10, head_zero_init=False)
    init32 = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    loaded = load_pretrained(path, init32)
    old = np.asarray(vit_init['params']['Transformer']['posembed_input']['pos_embedding'])
    new = loaded['params']['Transformer']['posembed_input']['pos_embedding']
    assert new.shape == (1, 1 + 8 * 8, 32)
    np.testing.assert_array_equal(new[:, :1], old[:, :1])  # the class token's row is kept
    # What vision_transformer (vit_jax/checkpoint.py) and big_vision (models/vit.py) do to the grid
    # of their .npz: scipy.ndimage.zoom with order=1.
    scipy_ndimage = pytest.importorskip('scipy.ndimage')
    grid = scipy_ndimage.zoom(old[0, 1:].reshape(4, 4, 32), (2, 2, 1), order=1)
    np.testing.assert_allclose(new[0, 1:], grid.reshape(64, 32), rtol=1e-6, atol=1e-6)
    rest = lambda t: {k: v for k, v in flatten(t).items() if k != f'params/{POSEMB}'}  # noqa
    _assert_trees_equal(rest(loaded), rest(vit_init))


def test_resample_posemb():
    posemb = np.random.default_rng(0).standard_normal((1, 1 + 9, 4), np.float32)
    np.testing.assert_array_equal(resample_posemb(posemb, (1, 10, 4), 1), posemb)
    constant = np.ones((1, 16, 4), np.float32)
    for method in ('bilinear_align_corners', 'bilinear', 'bicubic', 'bicubic_antialias'):
        resized = resample_posemb(constant, (1, 36, 4), 0, method=method)
        assert resized.dtype == np.float32
        np.testing.assert_allclose(resized, 1.0, atol=1e-6)
    assert resample_posemb(constant, (1, 12, 4), 0, new_grid=(3, 4)).shape == (1, 12, 4)
    with pytest.raises(ValueError, match='not a square'):
        resample_posemb(constant, (1, 12, 4), 0)
    with pytest.raises(ValueError, match='bicubic_antialias'):
        resample_posemb(constant, (1, 36, 4), 0, method='cubic')


# (old grid, new grid): up- and downsampling, odd and even, non-square, down to a single row.
_GRIDS = [((7, 7), (12, 12)), ((14, 14), (24, 24)), ((24, 24), (14, 14)), ((5, 5), (3, 3)),
          ((4, 6), (9, 3)), ((5, 5), (1, 1))]


@pytest.mark.parametrize('old,new', _GRIDS)
@pytest.mark.parametrize('method,mode,antialias', [
    ('bilinear', 'bilinear', False), ('bicubic', 'bicubic', False),
    ('bicubic_antialias', 'bicubic', True)])
def test_resample_posemb_is_pytorch_interpolate(old, new, method, mode, antialias):
    """Each PyTorch-style method against F.interpolate(align_corners=False) itself, in float64
    (bicubic: Keys a = -0.75 with clamped indices; antialias: a = -0.5 with renormalised edges)."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(sum(old) + 10 * sum(new))
    grid = rng.standard_normal((*old, 5))
    posemb = np.concatenate([rng.standard_normal((1, 1, 5)), grid.reshape(1, -1, 5)], axis=1)
    ours = resample_posemb(posemb, (1, 1 + new[0] * new[1], 5), 1, method=method, old_grid=old,
                           new_grid=new)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode=mode, align_corners=False,
        antialias=antialias)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours[:, :1], posemb[:, :1])
    np.testing.assert_allclose(ours[0, 1:].reshape(*new, 5), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('old,new', [((7, 7), (12, 12)), ((24, 24), (14, 14)), ((4, 6), (9, 3))])
def test_resample_posemb_bilinear_align_corners_is_scipy_zoom(old, new):
    """The .npz default is vision_transformer's and big_vision's scipy.ndimage.zoom(order=1)."""
    scipy_ndimage = pytest.importorskip('scipy.ndimage')
    grid = np.random.default_rng(0).standard_normal((*old, 5))
    ours = resample_posemb(grid.reshape(1, -1, 5), (1, new[0] * new[1], 5), 0, old_grid=old,
                           new_grid=new)
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    expected = scipy_ndimage.zoom(grid, zoom, order=1)
    assert expected.shape == (*new, 5)
    np.testing.assert_allclose(ours.reshape(*new, 5), expected, rtol=1e-10, atol=1e-12)


def test_resize_weights_differ_where_the_sources_differ():
    """The four methods are four different functions (so the tests above can tell them apart),
    and jax.image.resize's cubic is not PyTorch's plain bicubic."""
    weights = {m: resize_weights(7, 12, m) for m in
               ('bilinear_align_corners', 'bilinear', 'bicubic', 'bicubic_antialias')}
    for a in weights:
        np.testing.assert_allclose(weights[a].sum(1), 1.0, atol=1e-12)  # constants stay constant
        for b in weights:
            assert a == b or np.abs(weights[a] - weights[b]).max() > 1e-2, (a, b)
    jax_cubic = np.asarray(jax.image.resize(jnp.eye(7), (12, 7), 'cubic'))
    assert np.abs(jax_cubic - weights['bicubic']).max() > 1e-2


def test_timm_posemb_is_resampled_as_timm_does(tmp_path):
    """A timm ViT state dict loaded into a model for another resolution: the position embedding
    and then the logits are timm's own (checkpoint_filter_fn: bicubic, antialias=True)."""
    pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    shape = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    torch.manual_seed(0)
    source = VisionTransformer(img_size=28, **shape).eval()  # a 7x7 grid
    _randomise(source, torch)
    with torch.no_grad():  # a position embedding and a head large enough to show in the logits
        source.pos_embed.normal_(generator=torch.Generator().manual_seed(2))
        source.head.weight.normal_(generator=torch.Generator().manual_seed(3))
    path = tmp_path / 'vit28.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    for size in (48, 16):  # 7x7 -> 12x12 and 7x7 -> 4x4
        target = VisionTransformer(img_size=size, **shape).eval()
        target.load_state_dict(checkpoint_filter_fn(source.state_dict(), target))
        images = _nchw_images(size)
        with torch.no_grad():
            expected = target(torch.from_numpy(images)).numpy()

        model = get_model('vit', 10, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                          mlp_dim=64)
        nhwc = images.transpose(0, 2, 3, 1)
        abstract = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(nhwc.shape, jnp.float32))
        variables = load_pretrained(path, abstract)
        posemb = variables['params']['Transformer']['posembed_input']['pos_embedding']
        np.testing.assert_allclose(np.asarray(posemb)[0, 1:], target.pos_embed.detach().numpy()[0, 1:],
                                   rtol=1e-5, atol=1e-5)
        logits = np.asarray(model.apply(variables, nhwc, train=False))
        assert np.abs(expected).max() > 0.5
        np.testing.assert_allclose(logits, expected, atol=1e-4)


def _with_head(variables, num_classes: int, seed: int):
    """The variables of the same ViT with a fresh random head for num_classes (no model.init)."""
    rng = np.random.default_rng(seed)
    head = {'kernel': rng.standard_normal((32, num_classes), np.float32),
            'bias': rng.standard_normal(num_classes, np.float32)}
    return {'params': {**variables['params'], 'head': head}}


def test_head_is_reset_when_num_classes_differ(tmp_path, vit_init):
    path = _save_npz(tmp_path / 'vit.npz', vit_init['params'])
    init5 = _with_head(vit_init, 5, seed=1)
    loaded = load_pretrained(path, init5)
    _assert_trees_equal(loaded['params']['head'], init5['params']['head'])
    body = lambda t: {k: v for k, v in flatten(t).items()  # noqa: E731
                      if not k.startswith('params/head')}
    _assert_trees_equal(body(loaded), body(vit_init))

    with pytest.raises(PretrainedMismatchError) as err:  # the head is not allowed to differ
        load_pretrained(path, init5, dont_load=())
    assert 'head/kernel' in str(err.value) and '(32, 10)' in str(err.value)
    assert '(32, 5)' in str(err.value)

    # reinit: keep the init head even when the checkpoint's fits.
    init10 = _with_head(vit_init, 10, seed=2)
    loaded = load_pretrained(path, init10, reinit=('head/.*',))
    _assert_trees_equal(loaded['params']['head'], init10['params']['head'])


def test_wrong_file_names_every_problem_at_once(tmp_path, vit_init):
    flat = {k: np.asarray(v) for k, v in flatten(vit_init['params']).items()}
    flat['Transformer/encoder_norm/scale'] = np.ones(31, np.float32)  # wrong shape
    del flat['Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias']  # missing
    flat['Transformer/encoderblock_2/LayerNorm_0/scale'] = np.ones(32, np.float32)  # extra
    path = tmp_path / 'wrong.npz'
    np.savez(path, **flat)
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(path, vit_init)
    message = str(err.value)
    assert str(path) in message and len(err.value.problems) == 3
    assert 'Transformer/encoder_norm/scale' in message and '(31,)' in message and '(32,)' in message
    assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias' in message and 'missing' in message
    assert 'Transformer/encoderblock_2/LayerNorm_0/scale' in message and 'unexpected' in message
    assert isinstance(err.value, ValueError)


def test_merge_params_is_strict_and_honours_dont_load():
    zeros, ones = (lambda *s: np.zeros(s, np.float32)), (lambda *s: np.ones(s, np.float32))
    init = {'a': {'kernel': zeros(2, 3)}, 'head': {'kernel': zeros(3, 4), 'bias': zeros(4)}}
    loaded = {'a': {'kernel': ones(2, 3)}, 'head': {'kernel': ones(3, 5)},
              'pre_logits': {'kernel': ones(3)}}
    merged = merge_params(loaded, init, dont_load=('head/.*', 'pre_logits/.*'))
    np.testing.assert_array_equal(merged['a']['kernel'], 1.0)
    np.testing.assert_array_equal(merged['head']['kernel'], 0.0)
    with pytest.raises(PretrainedMismatchError, match='my.npz') as err:
        merge_params(loaded, init, source='my.npz')
    assert len(err.value.problems) == 3  # head/kernel shape, head/bias missing, pre_logits extra
    # 'head/.*' is a full match: it does not cover 'a/head/kernel'.
    with pytest.raises(PretrainedMismatchError, match='a/head/kernel'):
        merge_params({}, {'a': {'head': {'kernel': zeros(1)}}}, dont_load=('head/.*',))


def test_load_pretrained_errors(tmp_path, vit_init):
    with pytest.raises(FileNotFoundError, match='nowhere.npz'):
        load_pretrained(tmp_path / 'nowhere.npz', vit_init)
    resnet = {'params': {'stem_conv': {'kernel': np.zeros((3, 3, 3, 8))}}}
    with pytest.raises(PretrainedMismatchError, match='vit'):
        load_pretrained(_save_npz(tmp_path / 'vit.npz', vit_init['params']), resnet)


def test_fingerprint(vit_init):
    fp = fingerprint(vit_init)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(jax.tree_util.tree_map(np.asarray, vit_init)) == fp  # host or device
    changed = jax.tree_util.tree_map(np.array, vit_init)
    changed['params']['head']['bias'][0] += 1e-6
    assert fingerprint(changed) != fp
    zeros = {'w': np.zeros(4, jnp.bfloat16)}
    assert fingerprint(zeros) != fingerprint({'w': np.zeros(4, np.float16)})  # same bytes
    renamed = {'params': {**vit_init['params'], 'head2': vit_init['params']['head']}}
    del renamed['params']['head']
    assert fingerprint(renamed) != fp
