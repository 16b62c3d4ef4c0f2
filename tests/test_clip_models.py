"""CLIP in Flax (soupjax.models.clip) against open_clip and transformers, through every file layout
soupjax.importers.clip_checkpoint reads, on tiny random-weight models written by the references themselves.

Every parameter of the reference is perturbed (so no LayerNorm is 1 or 0 and no bias is 0), the JAX side
runs at float32 with jax.default_matmul_precision('highest'), torch at float32; image and text features
must agree within 1e-4.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
open_clip = pytest.importorskip('open_clip')
transformers = pytest.importorskip('transformers')

from soupjax.cli.errors import InputError  # noqa: E402
from soupjax.importers import clip_checkpoint  # noqa: E402
from soupjax.importers.clip_checkpoint import read_clip  # noqa: E402
from soupjax.importers.dispatch import load_pretrained, source_of  # noqa: E402
from soupjax.models import clip as clip_models  # noqa: E402

TOL = 1e-4
VOCAB, CONTEXT, IMAGE, PATCH, WIDTH, HEADS = 100, 12, 32, 8, 64, 4
TEXT_WIDTH, TEXT_HEADS, EMBED = 32, 4, 16


def _perturb(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _open_clip_model(quick_gelu: bool, *, width: int = WIDTH, patch: int = PATCH, image: int = IMAGE):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    model = CLIP(embed_dim=EMBED,
                 vision_cfg=CLIPVisionCfg(layers=2, width=width, head_width=width // HEADS,
                                          patch_size=patch, image_size=image),
                 text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=TEXT_WIDTH,
                                      heads=TEXT_HEADS, layers=2),
                 quick_gelu=quick_gelu)
    return _perturb(model, 1 + quick_gelu)


def _inputs(image: int = IMAGE):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, image, image, generator=gen)
    # The end-of-text token is the largest id, as CLIP's 49407; padding after it is 0.
    tokens = torch.randint(1, VOCAB - 2, (3, CONTEXT), generator=gen)
    tokens[0, 4], tokens[0, 5:] = VOCAB - 1, 0
    tokens[1, CONTEXT - 1] = VOCAB - 1
    tokens[2, 0], tokens[2, 1] = 1, VOCAB - 1
    tokens[2, 2:] = 0
    return images, tokens


def _nhwc(images) -> jnp.ndarray:
    return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


def _features(ckpt, images, tokens):
    with jax.default_matmul_precision('highest'):
        image = ckpt.image_encoder().apply({'params': ckpt.image_params}, _nhwc(images))
        text = ckpt.text_encoder().apply({'params': ckpt.text_params}, jnp.asarray(tokens.numpy(), jnp.int32))
    return np.asarray(image), np.asarray(text)


def _assert_features_match(ckpt, ref, what: str) -> None:
    """ckpt's image and text features on _inputs() equal the reference's (ref_image, ref_text) within TOL;
    the differences are printed for the closing figures."""
    image, text = _features(ckpt, *_inputs())
    ref_image, ref_text = ref
    print(f'{what}: image {np.abs(image - ref_image).max():.2e} text {np.abs(text - ref_text).max():.2e}')
    np.testing.assert_allclose(image, ref_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(text, ref_text, atol=TOL, rtol=0)


@pytest.fixture(scope='module')
def open_clip_files(tmp_path_factory):
    """For each activation: the model's reference features and its files in every open_clip layout."""
    from safetensors.torch import save_file
    out = {}
    images, tokens = _inputs()
    for quick_gelu in (True, False):
        model = _open_clip_model(quick_gelu)
        with torch.no_grad():
            ref = (model.encode_image(images).numpy(), model.encode_text(tokens).numpy())
        root = tmp_path_factory.mktemp(f'open_clip_{quick_gelu}')
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        files = {}
        files['pt'] = root / 'pt' / 'model.pt'
        files['safetensors'] = root / 'st' / 'open_clip_model.safetensors'
        files['torchscript'] = root / 'ts' / 'ViT-test.pt'
        for path in files.values():
            path.parent.mkdir()
        torch.save(state, files['pt'])
        save_file(state, str(files['safetensors']))
        torch.jit.script(model).save(str(files['torchscript']))
        if not quick_gelu:
            # LAION-style open_clip files come with open_clip_config.json, which states the activation;
            # the bare QuickGELU files exercise the rule for state dicts that say nothing.
            config = {'model_cfg': {'embed_dim': EMBED, 'quick_gelu': False,
                                    'vision_cfg': {'width': WIDTH, 'head_width': WIDTH // HEADS},
                                    'text_cfg': {'width': TEXT_WIDTH, 'heads': TEXT_HEADS}}}
            for key in ('pt', 'safetensors'):
                (files[key].parent / 'open_clip_config.json').write_text(json.dumps(config))
        out[quick_gelu] = dict(model=model, ref=ref, files=files)
    return out


def _read(path, stated_heads: bool = False, **kwargs):
    heads = {} if stated_heads else dict(vision_heads=HEADS, text_heads=TEXT_HEADS)
    return read_clip(path, **heads, **kwargs)


@pytest.mark.parametrize('quick_gelu', [True, False])
@pytest.mark.parametrize('layout', ['pt', 'safetensors', 'torchscript'])
def test_open_clip_parity(open_clip_files, quick_gelu, layout):
    case = open_clip_files[quick_gelu]
    path = case['files'][layout]
    stated = layout == 'torchscript' or not quick_gelu  # a scripted archive and open_clip_config.json say
    ckpt = _read(path, stated_heads=stated)
    assert ckpt.activation == ('quick_gelu' if quick_gelu else 'gelu_exact')
    assert (ckpt.vision.heads, ckpt.text.heads) == (HEADS, TEXT_HEADS)
    assert ckpt.vision == clip_checkpoint.VisionSize(IMAGE, PATCH, WIDTH, 2, HEADS, 4 * WIDTH, EMBED)
    _assert_features_match(ckpt, case['ref'], f'open_clip quick_gelu={quick_gelu} {layout}')
    assert ckpt.logit_scale == pytest.approx(float(case['model'].logit_scale))


def test_traced_torchscript_archive(tmp_path):
    """OpenAI's archives are traced, not scripted: no heads in them, QuickGELU modules kept."""
    model = _open_clip_model(True)
    images, tokens = _inputs()
    traced = torch.jit.trace_module(
        model, {'encode_image': (images,), 'encode_text': (tokens,)}, check_trace=False)
    path = tmp_path / 'ViT-traced.pt'
    traced.save(str(path))
    ckpt = _read(path)
    assert ckpt.format == 'TorchScript archive' and ckpt.activation == 'quick_gelu'
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(images).numpy(), model.encode_text(tokens).numpy()
    image, text = _features(ckpt, images, tokens)
    print(f'open_clip traced archive: image {np.abs(image - ref_image).max():.2e} '
          f'text {np.abs(text - ref_text).max():.2e}')
    np.testing.assert_allclose(image, ref_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(text, ref_text, atol=TOL, rtol=0)


def _hf_model(hidden_act: str):
    from transformers import CLIPConfig, CLIPModel
    common = dict(num_hidden_layers=2, hidden_act=hidden_act)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                         num_attention_heads=TEXT_HEADS, max_position_embeddings=CONTEXT,
                         bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0, **common),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS,
                           image_size=IMAGE, patch_size=PATCH, **common),
        projection_dim=EMBED)
    torch.manual_seed(0)
    return _perturb(CLIPModel(config), 5)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
    out = {}
    images, tokens = _inputs()
    for hidden_act in ('quick_gelu', 'gelu'):
        model = _hf_model(hidden_act)
        with torch.no_grad():
            ref = (model.get_image_features(pixel_values=images).pooler_output.numpy(),
                   model.get_text_features(input_ids=tokens).pooler_output.numpy())
        directory = tmp_path_factory.mktemp(f'hf_{hidden_act}')
        model.save_pretrained(directory)
        out[hidden_act] = dict(model=model, ref=ref, dir=directory)
    return out


@pytest.mark.parametrize('hidden_act,activation', [('quick_gelu', 'quick_gelu'), ('gelu', 'gelu_exact')])
@pytest.mark.parametrize('target', ['directory', 'model.safetensors'])
def test_transformers_parity(hf_dirs, hidden_act, activation, target):
    case = hf_dirs[hidden_act]
    path = case['dir'] if target == 'directory' else case['dir'] / 'model.safetensors'
    ckpt = read_clip(path)  # heads, activation and the end-of-text token from config.json
    assert ckpt.activation == activation and ckpt.format.startswith('transformers')
    assert (ckpt.vision.heads, ckpt.text.heads, ckpt.eos_token_id) == (HEADS, TEXT_HEADS, VOCAB - 1)
    _assert_features_match(ckpt, case['ref'], f'transformers {hidden_act} {target}')


def test_text_pooling_rules_agree_for_clip_vocabularies(open_clip_files):
    """argmax of the ids (open_clip) and the first end-of-text token (transformers) pick the same place."""
    ckpt = _read(open_clip_files[True]['files']['pt'])
    _, tokens = _inputs()
    tokens = jnp.asarray(tokens.numpy(), jnp.int32)
    encoder, variables = ckpt.text_encoder(), {'params': ckpt.text_params}
    with jax.default_matmul_precision('highest'):
        by_argmax = encoder.apply(variables, tokens)
        by_eos = encoder.clone(eos_token_id=VOCAB - 1).apply(variables, tokens)
        # Fewer tokens than the context: the first position embeddings, the same features.
        shorter = jax.jit(encoder.apply)(variables, tokens[2:, :4])
    np.testing.assert_array_equal(by_argmax, by_eos)
    np.testing.assert_allclose(shorter, by_argmax[2:], atol=1e-5, rtol=0)


def _classifier(num_classes: int = 5, **overrides):
    fields = dict(patch_size=PATCH, width=WIDTH, layers=2, heads=HEADS, embed_dim=EMBED)
    return clip_models.CLIPClassifier(num_classes=num_classes, **{**fields, **overrides})


def _init(model, image: int = IMAGE, abstract: bool = False):
    """The model's variables: random (numpy's generator: Flax's init runs its initialisers op by op,
    seconds on a CPU), or abstract (jax.eval_shape) where only the shapes matter."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                            jnp.zeros((1, image, image, 3)))
    if abstract:
        return shapes
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)


def _reference_logits(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The official model-soups ModelWrapper(normalize=True): a Linear on the normalised features."""
    features = torch.from_numpy(features)
    features = features / features.norm(dim=-1, keepdim=True)
    return torch.nn.functional.linear(features, torch.from_numpy(kernel.T.copy()),
                                      torch.from_numpy(bias)).numpy()


@pytest.mark.parametrize('layout', ['pt', 'safetensors', 'torchscript', 'hf'])
def test_load_pretrained_into_a_classifier(open_clip_files, hf_dirs, layout):
    if layout == 'hf':
        path, ref_image = hf_dirs['quick_gelu']['dir'], hf_dirs['quick_gelu']['ref'][0]
    else:
        case = open_clip_files[True]
        path, ref_image = case['files'][layout], case['ref'][0]
    assert source_of(path).name.startswith('a CLIP checkpoint')
    model = _classifier()
    init = _init(model)
    variables = load_pretrained(path, init)
    np.testing.assert_array_equal(variables['params']['head']['kernel'], init['params']['head']['kernel'])
    # A head of our own, to see the whole classifier against the official wrapper.
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(EMBED, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    params = {**variables['params'], 'head': {'kernel': kernel, 'bias': bias}}
    images, _ = _inputs()
    with jax.default_matmul_precision('highest'):
        logits = model.apply({'params': params}, _nhwc(images), train=False)
    reference = _reference_logits(ref_image, kernel, bias)
    print(f'CLIPClassifier from {layout}: logits {np.abs(logits - reference).max():.2e}')
    np.testing.assert_allclose(logits, reference, atol=TOL, rtol=0)


def test_model_soups_file_gives_image_tower_and_head(open_clip_files, tmp_path):
    """A model-soups ModelWrapper state dict: `model.` + CLIP's keys, text blocks deleted, and its head."""
    case = open_clip_files[True]
    state = {f'model.{k}': v for k, v in case['model'].state_dict().items()
             if not k.startswith('transformer.')}
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(EMBED, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    state['classification_head.weight'] = torch.from_numpy(kernel.T.copy())
    state['classification_head.bias'] = torch.from_numpy(bias)
    path = tmp_path / 'model_0.pt'
    torch.save(state, path)
    ckpt = _read(path)
    assert ckpt.text is None and ckpt.format.startswith('model-soups')
    model = _classifier()
    variables = load_pretrained(path, _init(model))
    images, _ = _inputs()
    with jax.default_matmul_precision('highest'):
        logits = model.apply(variables, _nhwc(images), train=False)
    reference = _reference_logits(case['ref'][0], kernel, bias)
    print(f'model-soups file: logits {np.abs(logits - reference).max():.2e}')
    np.testing.assert_allclose(logits, reference, atol=TOL, rtol=0)


def test_position_grid_is_resampled_as_open_clip_does(open_clip_files):
    from open_clip.model import resize_pos_embed
    case = open_clip_files[True]
    variables = load_pretrained(case['files']['safetensors'], _init(_classifier(), image=48))
    target = _open_clip_model(True, image=48)
    state = {k: v.clone() for k, v in case['model'].state_dict().items()}
    resize_pos_embed(state, target)  # bicubic, antialiased, as open_clip loads a checkpoint
    np.testing.assert_allclose(variables['params']['visual']['positional_embedding'],
                               state['visual.positional_embedding'].numpy(), atol=1e-5, rtol=0)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('overrides,tensor,shapes', [
    (dict(width=32, heads=2), 'visual.conv1.weight', ['(64, 3, 8, 8)', '(32, 3, 8, 8)']),
    (dict(patch_size=4), 'visual.conv1.weight', ['(64, 3, 8, 8)', '(64, 3, 4, 4)']),
    (dict(layers=3), 'visual.transformer.resblocks.2.ln_1.weight', ['(64,)']),
    (dict(embed_dim=8), 'visual.proj', ['(64, 16)', '(64, 8)']),
])
def test_another_model_is_refused_naming_the_tensor(open_clip_files, overrides, tensor, shapes):
    model = _classifier(**overrides)
    with pytest.raises(InputError) as error:
        load_pretrained(open_clip_files[True]['files']['pt'], _init(model, abstract=True))
    message = _one_line(error)
    assert tensor in message and all(shape in message for shape in shapes), message


def test_hf_other_patch_size_is_refused(hf_dirs):
    with pytest.raises(InputError) as error:
        load_pretrained(hf_dirs['gelu']['dir'], _init(_classifier(patch_size=4), abstract=True))
    message = _one_line(error)
    assert 'vision_model.embeddings.patch_embedding.weight' in message
    assert '(64, 3, 8, 8)' in message and '(64, 3, 4, 4)' in message


@pytest.mark.parametrize('key,shape', [('visual.ln_post.weight', '(64,)'),
                                       ('visual.transformer.resblocks.1.attn.in_proj_weight', '(192, 64)'),
                                       ('visual.conv1.weight', None)])
def test_missing_tensor_is_refused_naming_it(open_clip_files, tmp_path, key, shape):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in open_clip_files[True]['model'].state_dict().items() if k != key}
    path = tmp_path / 'broken.safetensors'
    save_file(state, str(path))
    assert source_of(path).name.startswith('a CLIP checkpoint')
    for read in (lambda: _read(path), lambda: load_pretrained(path, _init(_classifier(), abstract=True))):
        with pytest.raises(InputError) as error:
            read()
        message = _one_line(error)
        assert key in message and 'missing' in message and (shape is None or shape in message), message


def test_misshaped_tensor_is_refused_naming_both_shapes(open_clip_files, tmp_path):
    state = dict(open_clip_files[True]['model'].state_dict())
    state['visual.transformer.resblocks.0.mlp.c_proj.weight'] = torch.zeros(64, 100)
    path = tmp_path / 'broken.pt'
    torch.save(state, path)
    with pytest.raises(InputError) as error:
        _read(path)
    message = _one_line(error)
    assert 'visual.transformer.resblocks.0.mlp.c_proj.weight' in message
    assert '(64, 100)' in message and '(64, 256)' in message


def test_activation_rule(open_clip_files, hf_dirs):
    files = open_clip_files[False]['files']
    # open_clip_config.json beside the file states GELU; asking for QuickGELU is refused...
    with pytest.raises(InputError, match='model_cfg.quick_gelu=False') as error:
        read_clip(files['pt'], activation='quick_gelu')
    _one_line(error)
    # ... unless allowed on purpose.
    assert read_clip(files['pt'], activation='quick_gelu',
                     allow_activation_mismatch=True).activation == 'quick_gelu'
    # A TorchScript archive states it through its modules, a HF directory through config.json.
    with pytest.raises(InputError, match="GELU\\('none'\\)"):
        read_clip(files['torchscript'], activation='quick_gelu')
    with pytest.raises(InputError, match="hidden_act='quick_gelu'"):
        read_clip(hf_dirs['quick_gelu']['dir'], activation='gelu_exact')
    # A bare state dict says nothing: QuickGELU (OpenAI's) unless the caller says.
    bare = open_clip_files[True]['files']['pt']
    assert clip_checkpoint.stated_activation(bare) is None
    assert _read(bare).activation == 'quick_gelu'
    assert _read(bare, activation='gelu_exact').activation == 'gelu_exact'
    assert clip_checkpoint.stated_activation(files['torchscript']).name == 'gelu_exact'
    assert clip_checkpoint.stated_activation(hf_dirs['gelu']['dir']).name == 'gelu_exact'


def test_stated_heads_must_agree(hf_dirs):
    with pytest.raises(InputError, match='4 attention heads'):
        read_clip(hf_dirs['gelu']['dir'], vision_heads=2)
    with pytest.raises(InputError, match='4 attention heads'):
        load_pretrained(hf_dirs['gelu']['dir'], _init(_classifier(width=64, heads=2), abstract=True))


def test_torchscript_reader_runs_nothing(tmp_path):
    """A TorchScript-looking archive whose pickle calls a function is refused before the call."""
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.pt'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('evil/data.pkl', pickle.dumps({'visual.conv1.weight': Payload()}, protocol=2))
        archive.writestr('evil/constants.pkl', pickle.dumps((), protocol=2))
    with pytest.raises(InputError, match='nothing in it ran') as error:
        read_clip(path)
    _one_line(error)
    assert not marker.exists()


def test_timm_and_npz_files_are_not_claimed(tmp_path):
    from safetensors.numpy import save_file

    from soupjax.importers.sources import clip as clip_source
    timm_file = tmp_path / 'vit.safetensors'
    save_file({'patch_embed.proj.weight': np.zeros((8, 3, 4, 4), np.float32)}, str(timm_file))
    torch.save({'patch_embed.proj.weight': torch.zeros(8, 3, 4, 4)}, tmp_path / 'vit.pt')
    np.savez(tmp_path / 'vit.npz', **{'embedding/kernel': np.zeros((4, 4, 3, 8))})
    for name in ('vit.safetensors', 'vit.pt'):
        assert source_of(tmp_path / name).name == 'a timm state dict'
    assert source_of(tmp_path / 'vit.npz').name != clip_source.SOURCE.name
    assert not clip_source.is_clip_checkpoint(tmp_path / 'nothing-here.pt')
    (tmp_path / 'empty').mkdir()
    assert source_of(tmp_path / 'empty') is None


def test_sizes_are_open_clips():
    """CLIP_SIZES against open_clip's own model configs (ViT-B-32.json, ...), and the tree they build."""
    configs = Path(open_clip.__file__).parent / 'model_configs'
    for name, file in (('clip-vit-b/32', 'ViT-B-32'), ('clip-vit-b/16', 'ViT-B-16'),
                       ('clip-vit-l/14', 'ViT-L-14')):
        cfg = json.loads((configs / f'{file}.json').read_text())
        size = clip_models.CLIP_SIZES[name]
        vision, text = cfg['vision_cfg'], cfg['text_cfg']
        assert size['embed_dim'] == cfg['embed_dim'] and size['image_size'] == vision['image_size']
        assert size['vision'] == dict(patch_size=vision['patch_size'], width=vision['width'],
                                      layers=vision['layers'], heads=vision['width'] // 64)
        assert size['text'] == dict(context_length=text['context_length'], vocab_size=text['vocab_size'],
                                    width=text['width'], layers=text['layers'], heads=text['heads'])
    shapes = jax.eval_shape(clip_models.classifier('clip-vit-b/32', 1000).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 224, 224, 3)))['params']
    assert shapes['visual']['conv1']['kernel'].shape == (32, 32, 3, 768)
    assert shapes['visual']['positional_embedding'].shape == (50, 768)
    assert shapes['visual']['transformer']['resblocks_11']['attn']['query']['kernel'].shape == (768, 12, 64)
    assert shapes['visual']['proj'].shape == (768, 512)
    assert shapes['head']['kernel'].shape == (512, 1000)
    assert 'bias' not in shapes['visual']['conv1']


def test_bfloat16_runs_close_to_float32(open_clip_files):
    ckpt = _read(open_clip_files[True]['files']['pt'])
    images, _ = _inputs()
    half = jax.jit(ckpt.image_encoder(dtype=jnp.bfloat16).apply)({'params': ckpt.image_params}, _nhwc(images))
    assert half.dtype == jnp.float32
    full = open_clip_files[True]['ref'][0]
    assert np.abs(np.asarray(half) - full).max() < 0.05 * np.abs(full).max()


def test_a_checkpoint_without_clip_keys_is_refused(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / 'other.safetensors'
    save_file({'weight': np.zeros(3, np.float32)}, str(path))
    with pytest.raises(InputError, match='not a CLIP checkpoint'):
        read_clip(path)


def test_torchscript_reader_keeps_tensors_inside_their_storage(tmp_path):
    """A tensor record larger than its storage (read past it, or broadcast to allocate) is refused."""
    from collections import OrderedDict

    class Storage:
        pass

    class Tensor:
        def __init__(self, size, stride):
            self.size, self.stride = size, stride

        def __reduce__(self):
            rebuild = torch._utils._rebuild_tensor_v2
            return (rebuild, (Storage(), 0, self.size, self.stride, False, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ('storage', torch.FloatStorage, '0', 'cpu', 4) if isinstance(obj, Storage) else None

    for size, stride in (((1000,), (1,)), ((10 ** 6, 10 ** 6), (0, 0))):
        path = tmp_path / 'bad.pt'
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump({'visual.conv1.weight': Tensor(size, stride)})
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('bad/data.pkl', buffer.getvalue())
            archive.writestr('bad/data/0', np.zeros(4, np.float32).tobytes())
            archive.writestr('bad/constants.pkl', pickle.dumps((), protocol=2))
        with pytest.raises(InputError, match='reaches past its storage') as error:
            read_clip(path)
        _one_line(error)


def test_an_unsupported_open_clip_variant_is_refused(open_clip_files, tmp_path):
    """A tensor soupjax's CLIP has no place for (here LayerScale's) would change the function: refused."""
    state = dict(open_clip_files[True]['model'].state_dict())
    state['visual.transformer.resblocks.0.ls_1.gamma'] = torch.ones(WIDTH)
    path = tmp_path / 'layerscale.pt'
    torch.save(state, path)
    with pytest.raises(InputError) as error:
        _read(path)
    assert 'visual.transformer.resblocks.0.ls_1.gamma (64,) has no place' in _one_line(error)


def test_sharded_transformers_directory(hf_dirs, tmp_path):
    case = hf_dirs['quick_gelu']
    case['model'].save_pretrained(tmp_path, max_shard_size='100KB')
    assert (tmp_path / 'model.safetensors.index.json').is_file()
    ckpt = read_clip(tmp_path)
    images, tokens = _inputs()
    image, text = _features(ckpt, images, tokens)
    np.testing.assert_allclose(image, case['ref'][0], atol=TOL, rtol=0)
    np.testing.assert_allclose(text, case['ref'][1], atol=TOL, rtol=0)
