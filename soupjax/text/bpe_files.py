"""The files CLIP's tokenizer comes in, found beside a checkpoint and read into one ``BpeVocabulary``.

Three layouts hold the same vocabulary (49,408 ids: 256 byte symbols, the same 256 ending a word,
48,894 merges, start and end of text):

    bpe_simple_vocab_16e6.txt.gz   OpenAI's CLIP and open_clip: a header line, then merges, one "a b" a
                                   line; the vocabulary is built from them, as open_clip builds it
    vocab.json + merges.txt        Hugging Face's slow layout: token -> id, and merges after "#version"
    tokenizer.json                 Hugging Face's ``tokenizers`` layout: model.vocab and model.merges
                                   (merges as "a b" strings or as [a, b] pairs), added_tokens

Whatever the layout, the vocabulary is checked to be CLIP's kind (all 512 byte symbols, the start and
end tokens under open_clip's or Hugging Face's names, every merge's result in it), so that a GPT-2 or
WordPiece file is refused here with one line instead of failing on some word later.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from soupjax.cli.errors import InputError
from soupjax.text.byte_level import BYTE_TO_SYMBOL, END_OF_WORD

OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_TOKENIZER_FILE = "tokenizer.json"
# OpenAI's file holds 262,144 merges; CLIP uses the first 49152 - 256 - 2 (a 49,152-entry BPE vocabulary
# less the 256 byte symbols and the two special tokens), as OpenAI's and open_clip's tokenizers do.
CLIP_MERGES = 49152 - 256 - 2
# The special tokens: open_clip's names first, then Hugging Face's, which hold the same ids.
START_NAMES = ("<start_of_text>", "<|startoftext|>")
END_NAMES = ("<end_of_text>", "<|endoftext|>")
WHAT_IS_EXPECTED = (f"{HF_TOKENIZER_FILE}, or {HF_VOCAB_FILE} with {HF_MERGES_FILE} (Hugging Face), "
                    f"or {OPENAI_BPE_FILE} (OpenAI's CLIP and open_clip ship it, e.g. "
                    f"site-packages/open_clip/{OPENAI_BPE_FILE})")


@dataclass(frozen=True)
class BpeVocabulary:
    """CLIP's byte-level BPE as read from a file: what the tokenizer needs, whatever the layout.

    Attributes:
      token_ids: each token (byte-level symbols, a word's last piece ending in "</w>") -> its id.
      merges: the merges, highest priority first.
      start_id, end_id: the ids of the start- and end-of-text tokens.
      source: the file(s) it was read from, for messages.
    """
    token_ids: dict[str, int]
    merges: tuple[tuple[str, str], ...]
    start_id: int
    end_id: int
    source: str


@dataclass(frozen=True)
class TokenizerFiles:
    """Which tokenizer files were found: ``kind`` is 'openai_bpe', 'hf_vocab_merges' or 'hf_tokenizer_json';
    ``paths`` the file (or vocab.json then merges.txt)."""
    kind: str
    paths: tuple[Path, ...]


def _found_in(folder: Path) -> TokenizerFiles | None:
    """The tokenizer files in ``folder``, tokenizer.json first; None if none. Half a vocab.json/merges.txt
    pair is refused, naming the missing half."""
    if (folder / HF_TOKENIZER_FILE).is_file():
        return TokenizerFiles("hf_tokenizer_json", (folder / HF_TOKENIZER_FILE,))
    vocab, merges = folder / HF_VOCAB_FILE, folder / HF_MERGES_FILE
    if vocab.is_file() and merges.is_file():
        return TokenizerFiles("hf_vocab_merges", (vocab, merges))
    if (folder / OPENAI_BPE_FILE).is_file():
        return TokenizerFiles("openai_bpe", (folder / OPENAI_BPE_FILE,))
    if vocab.is_file() or merges.is_file():
        have, lack = (vocab, merges) if vocab.is_file() else (merges, vocab)
        raise InputError(f"CLIP tokenizer: {have} has no {lack.name} beside it; Hugging Face's layout needs "
                         f"both {HF_VOCAB_FILE} and {HF_MERGES_FILE} (or a {HF_TOKENIZER_FILE})")
    return None


def find_tokenizer_files(checkpoint_path: str | Path) -> TokenizerFiles:
    """The CLIP tokenizer files for a checkpoint: inside it if it is a directory (a Hugging Face checkpoint),
    beside it if it is a file (e.g. ``ViT-B-32.pt`` with ``bpe_simple_vocab_16e6.txt.gz`` next to it), or
    in a ``tokenizer/`` folder there. A tokenizer file itself (``*.gz``, ``*tokenizer.json``,
    ``vocab.json`` or ``merges.txt``) is taken as it is.

    Raises:
      InputError: nothing found, or half of a vocab.json/merges.txt pair; the message names the files
        expected and the folders searched.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise InputError(f"CLIP tokenizer: {path} does not exist (expected a checkpoint file or directory, "
                         f"or a tokenizer file: {WHAT_IS_EXPECTED})")
    if path.is_file():
        if path.name.endswith(".gz"):
            return TokenizerFiles("openai_bpe", (path,))
        if path.name.endswith(HF_TOKENIZER_FILE):
            return TokenizerFiles("hf_tokenizer_json", (path,))
        if path.name in (HF_VOCAB_FILE, HF_MERGES_FILE):
            vocab, merges = path.parent / HF_VOCAB_FILE, path.parent / HF_MERGES_FILE
            if vocab.is_file() and merges.is_file():
                return TokenizerFiles("hf_vocab_merges", (vocab, merges))
            other = HF_MERGES_FILE if path.name == HF_VOCAB_FILE else HF_VOCAB_FILE
            raise InputError(f"CLIP tokenizer: {path} has no {other} beside it; Hugging Face's layout needs "
                             f"both {HF_VOCAB_FILE} and {HF_MERGES_FILE}")
        folder = path.parent  # a checkpoint file: its tokenizer lies beside it
    else:
        folder = path
    searched = [folder, folder / "tokenizer"]
    for place in searched:
        if place.is_dir() and (found := _found_in(place)) is not None:
            return found
    where = " and ".join(str(p) for p in searched)
    raise InputError(f"CLIP tokenizer: no tokenizer file for {path}: looked in {where} for {WHAT_IS_EXPECTED}; "
                     "put one of them beside the checkpoint")


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (gunzipped if ``*.gz``); unreadable or undecodable files are one InputError line."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise InputError(f"CLIP tokenizer: cannot read {path} as {what}: {e}") from None


def _read_json(path: Path, what: str):
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"CLIP tokenizer: {path} is not {what}: invalid JSON ({e})") from None


def _merge_pair(entry, where: str) -> tuple[str, str]:
    """One merge, "a b" or [a, b], as a pair; anything else is refused naming ``where``."""
    if isinstance(entry, str):
        parts = entry.split(" ")
    elif isinstance(entry, (list, tuple)):
        parts = list(entry)
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise InputError(f"CLIP tokenizer: {where} is not a merge (expected two symbols, \"a b\" or "
                         f"[\"a\", \"b\"]): {entry!r}")
    return parts[0], parts[1]


def _checked_token_ids(vocab, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise InputError(f"CLIP tokenizer: {path} holds no vocabulary (expected an object token -> id)")
    for token, token_id in vocab.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise InputError(f"CLIP tokenizer: {path}: token {token!r} has id {token_id!r}, "
                             "expected a non-negative integer")
    return dict(vocab)


def _clip_vocabulary(token_ids: dict[str, int], merges: list[tuple[str, str]], source: str) -> BpeVocabulary:
    """Checks that ``token_ids``/``merges`` are CLIP's kind of BPE and finds its special tokens."""
    byte_symbols = list(BYTE_TO_SYMBOL.values())
    missing = [s for s in byte_symbols + [s + END_OF_WORD for s in byte_symbols] if s not in token_ids]
    if missing:
        raise InputError(f"CLIP tokenizer: {source} is not CLIP's byte-level BPE: {len(missing)} of its 512 "
                         f"byte symbols are missing from the vocabulary (e.g. {missing[0]!r}); "
                         f"expected {WHAT_IS_EXPECTED}")
    specials = []
    for names, role in ((START_NAMES, "start"), (END_NAMES, "end")):
        present = [n for n in names if n in token_ids]
        if not present:
            raise InputError(f"CLIP tokenizer: {source} has no {role}-of-text token (expected "
                             f"{' or '.join(repr(n) for n in names)} in its vocabulary): not CLIP's vocabulary")
        specials.append(token_ids[present[0]])
    if specials[0] == specials[1]:
        raise InputError(f"CLIP tokenizer: {source}: the start and end of text share id {specials[0]}")
    for rank, (a, b) in enumerate(merges):
        if a + b not in token_ids:
            raise InputError(f"CLIP tokenizer: {source}: merge {rank} ({a!r} {b!r}) makes {a + b!r}, "
                             "which is not in the vocabulary: the vocabulary and merges do not belong together")
    return BpeVocabulary(token_ids, tuple(merges), specials[0], specials[1], source)


def read_openai_bpe(path: str | Path) -> BpeVocabulary:
    """OpenAI's ``bpe_simple_vocab_16e6.txt.gz``: the first 48,894 merges after the header line; the
    vocabulary is the 256 byte symbols, the same ending a word, each merge's result in order, then
    open_clip's ``<start_of_text>`` and ``<end_of_text>`` (ids 49406 and 49407)."""
    path = Path(path)
    lines = _read_text(path, f"OpenAI's gzipped BPE merges ({OPENAI_BPE_FILE})").split("\n")
    if len(lines) < 1 + CLIP_MERGES:
        raise InputError(f"CLIP tokenizer: {path} has {max(len(lines) - 1, 0)} merge lines, CLIP needs "
                         f"{CLIP_MERGES}: not OpenAI's {OPENAI_BPE_FILE}")
    merges = []
    for number, line in enumerate(lines[1:1 + CLIP_MERGES], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"CLIP tokenizer: {path} line {number} is not a merge (expected two symbols "
                             f"separated by a space): {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    byte_symbols = list(BYTE_TO_SYMBOL.values())
    tokens = (byte_symbols + [s + END_OF_WORD for s in byte_symbols] + [a + b for a, b in merges]
              + [START_NAMES[0], END_NAMES[0]])
    # A later duplicate takes the id, as in the dict OpenAI's and open_clip's tokenizers build.
    token_ids = {token: i for i, token in enumerate(tokens)}
    return _clip_vocabulary(token_ids, merges, str(path))


def read_hf_vocab_merges(vocab_path: str | Path, merges_path: str | Path) -> BpeVocabulary:
    """Hugging Face's ``vocab.json`` (token -> id) and ``merges.txt`` ("a b" a line, after an optional
    "#version" line; blank lines skipped)."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    token_ids = _checked_token_ids(_read_json(vocab_path, "a Hugging Face vocab.json"), vocab_path)
    merges = []
    for number, line in enumerate(_read_text(merges_path, "a Hugging Face merges.txt").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        merges.append(_merge_pair(line, f"{merges_path} line {number}"))
    return _clip_vocabulary(token_ids, merges, f"{vocab_path} + {merges_path.name}")


def read_hf_tokenizer_json(path: str | Path) -> BpeVocabulary:
    """Hugging Face's ``tokenizer.json``: a BPE model's vocab and merges (as "a b" strings or [a, b]
    pairs); added tokens missing from the vocab (where some files keep the special tokens) are added.
    Its normalizer and pre-tokenizer are not used: the text is cleaned and split as open_clip does."""
    path = Path(path)
    data = _read_json(path, "a Hugging Face tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise InputError(f"CLIP tokenizer: {path} has no 'model' object: not a Hugging Face tokenizer.json")
    if model.get("type", "BPE") != "BPE":
        raise InputError(f"CLIP tokenizer: {path} holds a {model.get('type')} model; CLIP's tokenizer is BPE")
    token_ids = _checked_token_ids(model.get("vocab"), path)
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            token_ids.setdefault(added["content"], added["id"])
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise InputError(f"CLIP tokenizer: {path} has no model.merges list")
    merges = [_merge_pair(entry, f"{path} model.merges[{i}]") for i, entry in enumerate(raw_merges)]
    return _clip_vocabulary(token_ids, merges, str(path))


def read_vocabulary(path: str | Path) -> BpeVocabulary:
    """The BPE vocabulary for ``path``: a tokenizer file, or a checkpoint file or directory whose tokenizer
    files ``find_tokenizer_files`` finds."""
    found = find_tokenizer_files(path)
    if found.kind == "openai_bpe":
        return read_openai_bpe(found.paths[0])
    if found.kind == "hf_vocab_merges":
        return read_hf_vocab_merges(*found.paths)
    return read_hf_tokenizer_json(found.paths[0])
