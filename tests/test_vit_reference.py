"""Our ViT on imported checkpoints against independent references, and the GELU each source needs.

The reference forward passes are written here in float64 NumPy from the model definitions of
google-research/vision_transformer (vit_jax/models_vit.py) and google-research/big_vision
(big_vision/models/vit.py), not from soupjax's module: patch embedding (a VALID conv with stride p),
class token, position embedding, pre-LayerNorm blocks (LayerNorm eps 1e-6, multi-head dot-product
attention, MLP with Flax's nn.gelu, whose default is the tanh approximation), encoder_norm, head.
Random parameters are written to .npz files with each codebase's names, loaded through
soupjax.importers, and run by a model built the way train.py builds it: the activation is picked
from the checkpoint by importers.activation.resolve_activation, not given by the test.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # never reach the Hub, even by accident

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from soupjax import models
from soupjax.training import shared_init
from soupjax.importers.activation import (
    ActivationMismatchError,
    checkpoint_activation,
    resolve_activation,
    with_checkpoint_activation,
)
from soupjax.importers.dispatch import load_pretrained
from soupjax.io.trees import flatten

KEY = jax.random.key(0, impl='rbg')
# Float32 logits against the float64 reference: relative to the largest logit.
RTOL = 1e-5

# A small ViT: 3 heads of 8, a non-square 3x4 grid of 4x4 patches (12x16 images).
SHAPE = dict(patch=4, channels=3, hidden=24, heads=3, mlp=48, layers=2)
IMAGE_HW = (12, 16)
NUM_CLASSES = 7


# ---------------------------------------------------------------------------------------------
# The float64 reference, from the published model definitions


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    # flax.linen.gelu(x) with its default approximate=True (jax.nn.gelu).
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x: np.ndarray, p: dict, eps: float = 1e-6) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _attention(x: np.ndarray, p: dict) -> np.ndarray:
    """flax.linen.MultiHeadDotProductAttention(x, x): DenseGeneral q/k/v [D, heads, head_dim],
    queries scaled by 1/sqrt(head_dim), softmax over keys, DenseGeneral out [heads, head_dim, D]."""
    q, k, v = (np.einsum('bld,dhk->blhk', x, p[n]['kernel']) + p[n]['bias']
               for n in ('query', 'key', 'value'))
    q = q / np.sqrt(q.shape[-1])
    logits = np.einsum('bqhk,bjhk->bhqj', q, k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum('bhqj,bjhk->bqhk', weights, v)
    return np.einsum('bqhk,hkd->bqd', out, p['out']['kernel']) + p['out']['bias']


def _mlp(x: np.ndarray, p: dict) -> np.ndarray:
    x = _gelu_tanh(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
    return x @ p['Dense_1']['kernel'] + p['Dense_1']['bias']


def _block(x: np.ndarray, p: dict, names: tuple[str, str, str, str]) -> np.ndarray:
    ln0, attention, ln1, mlp = names
    x = x + _attention(_layer_norm(x, p[ln0]), p[attention])
    return x + _mlp(_layer_norm(x, p[ln1]), p[mlp])


def _patch_embed(images: np.ndarray, p: dict) -> np.ndarray:
    """nn.Conv(D, (P, P), strides=(P, P), padding='VALID'), then [n, h*w, D] in row-major order."""
    ph, pw, c, d = p['kernel'].shape
    n, height, width, _ = images.shape
    patches = images.reshape(n, height // ph, ph, width // pw, pw, c)
    x = np.einsum('nhawbc,abcd->nhwd', patches, p['kernel']) + p['bias']
    return x.reshape(n, -1, d)


def _tree(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value, np.float64)
    return tree


def vision_transformer_forward(flat: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """vit_jax/models_vit.py VisionTransformer.__call__ (no ResNet root), in float64."""
    p = _tree(flat)
    x = _patch_embed(np.asarray(images, np.float64), p['embedding'])
    token = 'cls' in p  # classifier='token'; otherwise 'gap'
    if token:
        x = np.concatenate([np.tile(p['cls'], (x.shape[0], 1, 1)), x], axis=1)
    x = x + p['Transformer']['posembed_input']['pos_embedding']
    for i in range(len([k for k in p['Transformer'] if k.startswith('encoderblock_')])):
        x = _block(x, p['Transformer'][f'encoderblock_{i}'],
                   ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'))
    x = _layer_norm(x, p['Transformer']['encoder_norm'])
    x = x[:, 0] if token else x.mean(1)
    if 'pre_logits' in p:  # representation_size
        x = np.tanh(x @ p['pre_logits']['kernel'] + p['pre_logits']['bias'])
    return x @ p['head']['kernel'] + p['head']['bias']


def big_vision_forward(flat: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """big_vision/models/vit.py _Model.__call__ (posemb 'learn', pool_type 'tok' or 'gap'):
    the position embedding is added to the patches BEFORE the class token is prepended."""
    p = _tree({k[len('params/'):]: v for k, v in flat.items() if k.startswith('params/')})
    x = _patch_embed(np.asarray(images, np.float64), p['embedding'])
    x = x + p['pos_embedding']
    token = 'cls' in p
    if token:
        x = np.concatenate([np.tile(p['cls'], (x.shape[0], 1, 1)), x], axis=1)
    blocks = p['Transformer']
    if 'encoderblock' in blocks:  # nn.scan: every leaf stacked on a leading layer axis
        stacked = blocks['encoderblock']
        depth = len(stacked['LayerNorm_0']['scale'])
        layers = [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(depth)]
    else:
        layers = [blocks[f'encoderblock_{i}'] for i in range(len(blocks) - 1)]
    for layer in layers:
        x = _block(x, layer, ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                              'MlpBlock_0'))
    x = _layer_norm(x, blocks['encoder_norm'])
    x = x[:, 0] if token else x.mean(1)
    return x @ p['head']['kernel'] + p['head']['bias']


# ---------------------------------------------------------------------------------------------
# Random checkpoints in each codebase's names


def _random_block(rng: np.random.Generator, names: tuple[str, str, str, str]) -> dict:
    d, h, m = SHAPE['hidden'], SHAPE['heads'], SHAPE['mlp']
    normal = lambda *shape, std=1.0: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa
    ln0, attention, ln1, mlp = names
    block = {}
    for ln in (ln0, ln1):
        block[f'{ln}/scale'] = 1 + normal(d, std=0.2)
        block[f'{ln}/bias'] = normal(d, std=0.2)
    for n in ('query', 'key', 'value'):
        block[f'{attention}/{n}/kernel'] = normal(d, h, d // h, std=d ** -0.5)
        block[f'{attention}/{n}/bias'] = normal(h, d // h, std=0.1)
    block[f'{attention}/out/kernel'] = normal(h, d // h, d, std=d ** -0.5)
    block[f'{attention}/out/bias'] = normal(d, std=0.1)
    # Pre-activations of a few units: where the two GELUs differ most (up to 4.7e-4 near |x| = 2.7).
    block[f'{mlp}/Dense_0/kernel'] = normal(d, m, std=2 * d ** -0.5)
    block[f'{mlp}/Dense_0/bias'] = normal(m, std=0.5)
    block[f'{mlp}/Dense_1/kernel'] = normal(m, d, std=m ** -0.5)
    block[f'{mlp}/Dense_1/bias'] = normal(d, std=0.1)
    return block


def _random_stem_and_head(rng: np.random.Generator, grid_tokens: int, token: bool,
                          representation_size: int | None) -> dict[str, np.ndarray]:
    p, c, d = SHAPE['patch'], SHAPE['channels'], SHAPE['hidden']
    normal = lambda *shape, std=1.0: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa
    flat = {'embedding/kernel': normal(p, p, c, d, std=(p * p * c) ** -0.5),
            'embedding/bias': normal(d, std=0.1),
            'posemb': normal(1, grid_tokens, d, std=0.5),
            'Transformer/encoder_norm/scale': 1 + normal(d, std=0.2),
            'Transformer/encoder_norm/bias': normal(d, std=0.2)}
    if token:
        flat['cls'] = normal(1, 1, d)
    width = d
    if representation_size:
        flat['pre_logits/kernel'] = normal(d, representation_size, std=d ** -0.5)
        flat['pre_logits/bias'] = normal(representation_size, std=0.1)
        width = representation_size
    flat['head/kernel'] = normal(width, NUM_CLASSES, std=3 * width ** -0.5)
    flat['head/bias'] = normal(NUM_CLASSES, std=0.1)
    return flat


def vision_transformer_params(seed: int, *, pooling: str = 'token',
                              representation_size: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = (IMAGE_HW[0] // SHAPE['patch']) * (IMAGE_HW[1] // SHAPE['patch'])
    token = pooling == 'token'
    flat = _random_stem_and_head(rng, grid + token, token, representation_size)
    flat['Transformer/posembed_input/pos_embedding'] = flat.pop('posemb')
    names = ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
    for i in range(SHAPE['layers']):
        flat.update({f'Transformer/encoderblock_{i}/{k}': v
                     for k, v in _random_block(rng, names).items()})
    return flat


def big_vision_params(seed: int, *, pooling: str, scanned: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = (IMAGE_HW[0] // SHAPE['patch']) * (IMAGE_HW[1] // SHAPE['patch'])
    flat = _random_stem_and_head(rng, grid, pooling == 'token', None)
    flat['pos_embedding'] = flat.pop('posemb')  # top level, no row for the class token
    names = ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
    layers = [_random_block(rng, names) for _ in range(SHAPE['layers'])]
    if scanned:
        flat.update({f'Transformer/encoderblock/{k}': np.stack([layer[k] for layer in layers])
                     for k in layers[0]})
    else:
        for i, layer in enumerate(layers):
            flat.update({f'Transformer/encoderblock_{i}/{k}': v for k, v in layer.items()})
    # big_vision checkpoints hold the params under 'params/', next to other state.
    return {**{f'params/{k}': v for k, v in flat.items()}, 'opt/state': np.zeros(3, np.float32)}


# ---------------------------------------------------------------------------------------------
# Building and running our model as train.py does


def _config(path, **model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        'model': {'name': 'vit', 'patch_size': SHAPE['patch'], 'hidden_size': SHAPE['hidden'],
                  'num_layers': SHAPE['layers'], 'num_heads': SHAPE['heads'],
                  'mlp_dim': SHAPE['mlp'], **model},
        'init_from': {'path': str(path), 'dont_load': ['head/.*']}})


def _build(config: ml_collections.ConfigDict):
    """models.build_model, without the data config: the model of config.model."""
    kwargs = config.model.to_dict()
    return models.get_model(kwargs.pop('name'), NUM_CLASSES, **kwargs)


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, *IMAGE_HW, 3)).astype(np.float32)


def _logits(config: ml_collections.ConfigDict, images: np.ndarray) -> tuple[np.ndarray, object]:
    model = models.build_model(config.model, NUM_CLASSES, resolve_activation(config))  # as train.py does
    abstract = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(images.shape, jnp.float32))
    variables = load_pretrained(config.init_from.path, abstract)
    with jax.default_matmul_precision('highest'):  # float32 matmuls also on GPUs (TF32 otherwise)
        return np.asarray(model.apply(variables, images, train=False)), model


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _assert_matches_only_with_tanh_gelu(config, images, reference):
    logits, model = _logits(config, images)
    assert model.gelu_approximate, 'an .npz must select the tanh GELU by itself'
    assert np.abs(reference).max() > 1.0, 'logits too small for the test to mean anything'
    error = _relative_error(logits, reference)
    print(f'tanh GELU (chosen from the checkpoint): relative error {error:.1e}')
    assert error < RTOL

    # The exact GELU, asked for on purpose, runs another function: the test can fail.
    exact = config.copy_and_resolve_references()
    exact.model.gelu_approximate = False
    exact.init_from.allow_activation_mismatch = True
    logits_exact, model_exact = _logits(exact, images)
    assert not model_exact.gelu_approximate
    error_exact = _relative_error(logits_exact, reference)
    print(f'exact GELU: relative error {error_exact:.1e}')
    assert error_exact > 10 * RTOL


# ---------------------------------------------------------------------------------------------
# .npz: vision_transformer and big_vision


@pytest.mark.parametrize('pooling,representation_size', [('token', None), ('token', 16),
                                                        ('gap', None)])
def test_vision_transformer_npz_matches_float64_reference(tmp_path, pooling, representation_size):
    flat = vision_transformer_params(1, pooling=pooling, representation_size=representation_size)
    path = tmp_path / 'vit.npz'
    np.savez(path, **flat)
    images = _images()
    reference = vision_transformer_forward(flat, images)
    config = _config(path, pooling=pooling, representation_size=representation_size)
    _assert_matches_only_with_tanh_gelu(config, images, reference)


@pytest.mark.parametrize('pooling,scanned', [('token', False), ('token', True), ('gap', True)])
def test_big_vision_npz_matches_float64_reference(tmp_path, pooling, scanned):
    flat = big_vision_params(2, pooling=pooling, scanned=scanned)
    path = tmp_path / 'bv.npz'
    np.savez(path, **flat)
    images = _images(1)
    reference = big_vision_forward(flat, images)
    _assert_matches_only_with_tanh_gelu(_config(path, pooling=pooling), images, reference)


def test_the_references_are_the_published_architecture():
    """The two references agree with each other where the architectures coincide: a
    vision_transformer checkpoint rewritten in big_vision's names (class token's position row 0,
    as a big_vision model has none) gives the same logits."""
    flat = vision_transformer_params(3)
    posemb = flat['Transformer/posembed_input/pos_embedding'].copy()
    posemb[:, 0] = 0
    flat['Transformer/posembed_input/pos_embedding'] = posemb
    renames = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
               'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
    bv = {'params/pos_embedding': posemb[:, 1:]}
    for path, value in flat.items():
        if path == 'Transformer/posembed_input/pos_embedding':
            continue
        parts = path.split('/')
        if len(parts) > 2 and parts[1].startswith('encoderblock_'):
            parts[2] = renames.get(parts[2], parts[2])
        bv['params/' + '/'.join(parts)] = value
    images = _images(2)
    np.testing.assert_allclose(big_vision_forward(bv, images),
                               vision_transformer_forward(flat, images), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# timm: the exact GELU, chosen by itself


def test_timm_state_dict_selects_exact_gelu_and_matches_timm(tmp_path):
    pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    reference = VisionTransformer(
        img_size=IMAGE_HW, patch_size=SHAPE['patch'], embed_dim=SHAPE['hidden'],
        depth=SHAPE['layers'], num_heads=SHAPE['heads'], mlp_ratio=SHAPE['mlp'] / SHAPE['hidden'],
        num_classes=NUM_CLASSES).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights large enough for the GELUs to differ visibly in the logits
        for name, param in reference.named_parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            std = (2.0 if 'fc1' in name or 'head' in name else 1.0) * fan_in ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * (std if param.ndim > 1 else 0.2)
                        + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
    images = _images(3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).double().numpy()
    path = tmp_path / 'vit.safetensors'
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

    logits, model = _logits(_config(path), images)
    assert not model.gelu_approximate, 'a timm file must select the exact GELU by itself'
    assert np.abs(expected).max() > 1.0
    error = _relative_error(logits, expected)
    print(f'exact GELU (chosen from the checkpoint) vs timm: relative error {error:.1e}')
    assert error < RTOL

    tanh = _config(path, gelu_approximate=True)
    tanh.init_from.allow_activation_mismatch = True
    logits_tanh, _ = _logits(tanh, images)
    assert _relative_error(logits_tanh, expected) > 10 * RTOL


# ---------------------------------------------------------------------------------------------
# The choice of the activation: the rules of with_checkpoint_activation


@pytest.mark.parametrize('name,approximate', [('w.npz', True), ('w.safetensors', False),
                                              ('w.pth', False), ('w.pt', False), ('w.bin', False)])
def test_activation_follows_the_checkpoint_format(tmp_path, name, approximate):
    config = _config(tmp_path / name)  # the file need not exist: the format decides
    resolved = with_checkpoint_activation(config)
    assert resolved.model.gelu_approximate is approximate
    assert 'gelu_approximate' not in config.model, 'the caller\'s config is never modified'
    assert with_checkpoint_activation(resolved) is resolved  # idempotent
    assert checkpoint_activation(tmp_path / name).gelu_approximate is approximate
    assert resolve_activation(config) == ('gelu_tanh' if approximate else 'gelu_exact')
    assert models.build_model(config.model, NUM_CLASSES, resolve_activation(config)).gelu_approximate is approximate


def test_models_not_initialised_from_a_file_keep_the_exact_default(tmp_path):
    scratch = _config('')
    assert with_checkpoint_activation(scratch) is scratch
    assert resolve_activation(scratch) is None  # the config's own fields decide
    assert _build(scratch).gelu_approximate is False
    assert models.activation(_build(scratch)) == 'gelu_exact'
    # A ResNet from a timm file: it has no GELU, nothing is added to its model config.
    resnet = ml_collections.ConfigDict({'model': {'name': 'resnet18'},
                                        'init_from': {'path': str(tmp_path / 'r.safetensors')}})
    assert with_checkpoint_activation(resnet) is resnet
    # An unknown source (here a directory that is no ingredient): the load will say what is wrong.
    unknown = _config(tmp_path)
    assert with_checkpoint_activation(unknown) is unknown


def test_a_contradicting_config_is_refused_unless_allowed(tmp_path):
    path = tmp_path / 'ViT-B_16.npz'
    config = _config(path, gelu_approximate=False)
    with pytest.raises(ActivationMismatchError) as err:
        with_checkpoint_activation(config)
    message = str(err.value)
    assert str(path) in message
    assert 'tanh-approximate GELU' in message and 'exact (erf) GELU' in message
    assert 'allow_activation_mismatch' in message and isinstance(err.value, ValueError)

    timm_config = _config(tmp_path / 'vit.safetensors', gelu_approximate=True)
    with pytest.raises(ActivationMismatchError, match='vit.safetensors'):
        with_checkpoint_activation(timm_config)

    config.init_from.allow_activation_mismatch = True
    assert with_checkpoint_activation(config) is config  # the config's GELU, on purpose
    assert resolve_activation(config) == 'gelu_exact'
    agreeing = _config(path, gelu_approximate=True)
    assert with_checkpoint_activation(agreeing) is agreeing


def test_locked_configs_are_resolved_too(tmp_path):
    config = _config(tmp_path / 'w.npz')
    config.lock()  # as absl's config_flags hands them over
    resolved = with_checkpoint_activation(config)
    assert resolved.model.gelu_approximate is True and resolved.is_locked


def _fake_ingredient(directory, meta: dict):
    (directory / 'variables').mkdir(parents=True)
    (directory / 'meta.json').write_text(json.dumps(meta))
    return directory


def test_activation_of_an_upstream_ingredient(tmp_path):
    recorded = _fake_ingredient(tmp_path / 'a', {'activation': 'gelu_tanh', 'config': {}})
    assert with_checkpoint_activation(_config(recorded)).model.gelu_approximate is True
    configured = _fake_ingredient(tmp_path / 'b', {'config': {'model': {
        'name': 'vit-testing', 'gelu_approximate': True}}})
    assert checkpoint_activation(configured).gelu_approximate is True
    # Ingredients from before the activation was recorded ran the model's default, exact.
    old = _fake_ingredient(tmp_path / 'c', {'config': {'model': {'name': 'vit-testing'}}})
    assert checkpoint_activation(old).gelu_approximate is False
    resnet = _fake_ingredient(tmp_path / 'd', {'activation': 'relu', 'config': {}})
    assert checkpoint_activation(resnet) is None
    with pytest.raises(ActivationMismatchError, match='soupjax ingredient'):
        with_checkpoint_activation(_config(recorded, gelu_approximate=False))


def test_train_refuses_a_contradicting_config_before_writing_anything(tmp_path):
    from soupjax.training import train
    from soupjax.config.base import base_config
    config = base_config()
    config.model = {'name': 'vit-testing', 'gelu_approximate': False}
    config.init_from.path = str(tmp_path / 'augreg.npz')  # refused before it is even read
    with pytest.raises(ActivationMismatchError, match='augreg.npz'):
        train.train(config, tmp_path / 'work')
    assert not (tmp_path / 'work' / 'config.json').exists()


def test_ingredient_meta_records_the_activation_it_ran(tmp_path):
    """train_and_evaluate from an .npz, the config silent about the GELU: the ingredient runs the
    tanh GELU, says so in meta.json, and keeps the config as given (a rerun compares with it)."""
    import importlib.util
    from pathlib import Path

    import tensorflow_datasets as tfds

    from soupjax.io import checkpoints
    from soupjax.training import train
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('cifar10_vit_ti16',
                                                  root / 'configs' / 'cifar10_vit_ti16.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config('testing')
    assert config.model.gelu_approximate is True  # the reference config asks for the AugReg GELU
    config.model = {k: v for k, v in config.model.items() if k != 'gelu_approximate'}
    config.total_steps = 1

    model = models.build_model_from_run_config(config)
    params = jax.jit(model.init)(KEY, jnp.zeros(shared_init.input_shape(config), jnp.float32))['params']
    path = tmp_path / 'upstream.npz'
    np.savez(path, **{k: np.asarray(v) for k, v in flatten(params).items()})
    config.init_from.path = str(path)
    with tfds.testing.mock_data(num_examples=16):
        meta = train.train_and_evaluate(config, tmp_path / 'work', tmp_path / 'ingredient')
    assert meta['activation'] == 'gelu_tanh'
    assert 'gelu_approximate' not in meta['config']['model']
    assert checkpoints.load_meta(tmp_path / 'ingredient')['activation'] == 'gelu_tanh'
    # A run that starts from this ingredient follows it.
    downstream = _config(tmp_path / 'ingredient')
    assert with_checkpoint_activation(downstream).model.gelu_approximate is True
    # Cooking rebuilds the ingredient's model from its meta.json alone, the init file gone: the same GELU.
    path.unlink()
    stored = checkpoints.load_meta(tmp_path / 'ingredient')
    rebuilt = models.build_model(stored['config']['model'], model.num_classes, stored['activation'])
    assert rebuilt.gelu_approximate is True and model.gelu_approximate is False  # the config's default
