"""Tiny CLIP checkpoints written by open_clip itself (random weights, perturbed so that no LayerNorm is
1 or 0), with the tokenizer file that open_clip ships beside them: what a user's OpenAI/open_clip files
look like, small enough for tests. Used by the zero-shot, training and import tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# CLIP's real vocabulary and context: the zero-shot head tokenizes real texts.
VOCAB, CONTEXT = 49408, 77
# Widths of 64 with one head each: the head count of a bare state dict is told from its width (64 per head).
IMAGE, PATCH, WIDTH, HEADS, LAYERS = 32, 8, 64, 1, 2
TEXT_WIDTH, TEXT_HEADS, EMBED = 64, 1, 16


def tiny_open_clip(quick_gelu: bool = True, seed: int = 0):
    """An open_clip CLIP of the tiny size above, its parameters perturbed away from their init."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(embed_dim=EMBED,
                 vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                                          image_size=IMAGE),
                 text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=TEXT_WIDTH,
                                      heads=TEXT_HEADS, layers=LAYERS),
                 quick_gelu=quick_gelu)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def bpe_vocabulary_file() -> Path:
    """The bpe_simple_vocab_16e6.txt.gz that the installed open_clip ships."""
    import open_clip
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def write_open_clip_file(model, directory: Path, name: str = "clip.pt") -> Path:
    """``model``'s state dict as ``directory/name`` (.pt or .safetensors), with OpenAI's tokenizer file
    beside it, as a user keeps them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = directory / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    shutil.copy(bpe_vocabulary_file(), directory / "bpe_simple_vocab_16e6.txt.gz")
    return path


def tiny_model_config(**overrides) -> dict:
    """soupjax's model config for the tiny size (``get_model('clip-testing', ...)`` fields)."""
    return {"name": "clip-testing", "patch_size": PATCH, "width": WIDTH, "layers": LAYERS, "heads": HEADS,
            "embed_dim": EMBED, **overrides}
