"""CLIP's tokenizer in pure Python, token for token equal to open_clip's (``open_clip.tokenize``).

    tokenizer = ClipTokenizer.from_path('ViT-B-32.pt')      # finds bpe_simple_vocab_16e6.txt.gz beside it
    tokenizer = ClipTokenizer.from_path('clip-vit-base-patch32/')        # a Hugging Face checkpoint
    tokens = tokenizer.tokenize(['a photo of a cat.', 'a photo of a dog.'])   # int32 [2, 77]

What open_clip does, and so what this does (its default 'lower' cleaning, no reduction mask):
  1. clean: ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, full-width letters, control characters,
     NFC), HTML entities unescaped twice (so "&amp;amp;" becomes "&"), whitespace runs to one space and
     the ends stripped, then lower case;
  2. split into words with CLIP's pattern (open_clip's special-token names, the English contractions,
     letter runs, single digits, runs of other non-space characters; case-insensitive as open_clip's);
  3. each word as UTF-8 byte symbols, its last one marked "</w>", merged by BPE (results cached per word);
  4. start-of-text, the ids, end-of-text; rows of ``context_length`` (77), zero-padded; a text too long is
     cut to ``context_length`` and its last id replaced by end-of-text.

Whichever file the vocabulary came from (OpenAI's, Hugging Face's), the text is cleaned and split as
above: a ``tokenizer.json``'s own normalizer is ignored. Text that spells open_clip's special token names
("<start_of_text>", "<end_of_text>") becomes those tokens, as in open_clip; Hugging Face's spellings
("<|endoftext|>") are ordinary text, as in open_clip. Hugging Face's tokenizer differs from open_clip's on
some text (it neither runs ftfy nor unescapes HTML, and pads with end-of-text): tests/test_clip_tokenizer.py
lists each difference with its example.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

from soupjax.cli.errors import InputError
from soupjax.text.bpe_files import END_NAMES, START_NAMES, BpeVocabulary, read_vocabulary
from soupjax.text.byte_level import END_OF_WORD, from_symbols, to_symbols

CONTEXT_LENGTH = 77  # every OpenAI and open_clip CLIP model's text context
# open_clip's names of the special tokens: text that spells them becomes them.
_SPECIAL_IN_TEXT = (START_NAMES[0], END_NAMES[0])
# CLIP's word pattern: a special token, an English contraction, a run of letters, ONE digit (numbers are
# split digit by digit), or a run of anything else that is not whitespace. Case-insensitive as open_clip
# compiles it (it matters for "'ſ", whose long s folds to "s": a contraction there, but not in transformers).
_WORDS = regex.compile("|".join(regex.escape(name) for name in _SPECIAL_IN_TEXT)
                       + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# The per-word cache is emptied past this many words, so a long-running process stays bounded.
_CACHE_LIMIT = 200_000
_NOT_A_MERGE = float("inf")


def clean_text(text: str) -> str:
    """``text`` as open_clip cleans it before splitting (its 'lower' cleaning): ftfy's fixes, HTML
    unescaped twice, whitespace runs to one space, ends stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """``word`` (byte-level symbols) as BPE pieces: its last symbol marked "</w>", then, while some
    adjacent pair is a merge, every occurrence of the highest-priority pair (lowest rank) is joined,
    left to right without overlap."""
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        pairs = list(zip(pieces, pieces[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, _NOT_A_MERGE))
        if best not in ranks:
            break
        joined, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                joined.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                joined.append(pieces[i])
                i += 1
        pieces = joined
    return pieces


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer over a ``BpeVocabulary``; see the module docstring for the rules."""

    def __init__(self, vocabulary: BpeVocabulary):
        self.vocabulary = vocabulary
        self._ids = vocabulary.token_ids
        self._tokens = {i: token for token, i in self._ids.items()}
        # A repeated merge keeps its last rank, as in open_clip's dict.
        self._ranks = {pair: rank for rank, pair in enumerate(vocabulary.merges)}
        self._special = {_SPECIAL_IN_TEXT[0]: vocabulary.start_id, _SPECIAL_IN_TEXT[1]: vocabulary.end_id}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_path(cls, path: str | Path) -> "ClipTokenizer":
        """The tokenizer for ``path``: a tokenizer file (``bpe_simple_vocab_16e6.txt.gz``, ``tokenizer.json``,
        ``vocab.json``/``merges.txt``), or a checkpoint file or directory with one beside or inside it
        (see ``soupjax.text.bpe_files.find_tokenizer_files``). Raises InputError naming what is expected."""
        return cls(read_vocabulary(path))

    @property
    def start_id(self) -> int:
        """The start-of-text id (49406 in CLIP's vocabulary)."""
        return self.vocabulary.start_id

    @property
    def end_id(self) -> int:
        """The end-of-text id (49407 in CLIP's vocabulary); text models pool at its first position."""
        return self.vocabulary.end_id

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the rows a text model's token embedding needs."""
        return max(self._ids.values()) + 1

    def _word_ids(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is None:
            if word in self._special:
                cached = (self._special[word],)
            else:
                cached = tuple(self._ids[piece] for piece in bpe_pieces(to_symbols(word), self._ranks))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = cached
        return cached

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, cleaned and split as open_clip does, without start/end of text."""
        ids: list[int] = []
        for word in _WORDS.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """``texts`` as int32 [N, context_length] rows, as ``open_clip.tokenize`` returns them: start of text,
        the ids, end of text, zeros after; a text too long keeps its first context_length - 1 ids (start
        included) and ends with end of text. A single string gives one row.

        Raises:
          InputError: a text that is not a string, or a context_length below 2 (start and end of text).
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
                or context_length < 2:
            raise InputError(f"CLIP tokenizer: context_length must be an integer of at least 2 (start and end "
                             f"of text), got {context_length!r}")
        rows = np.zeros((len(texts), int(context_length)), np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"CLIP tokenizer: texts[{row}] is a {type(text).__name__}, expected a str")
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.end_id]
            rows[row, :len(ids)] = ids
        return rows

    __call__ = tokenize

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (lower-cased and cleaned, as tokenized): pieces ending a word are followed by
        a space; special tokens show as open_clip's names; unknown ids are refused."""
        names = {self.start_id: _SPECIAL_IN_TEXT[0], self.end_id: _SPECIAL_IN_TEXT[1]}
        out, pending = [], []
        for i in (int(i) for i in ids):
            if i in names:
                out += [from_symbols("".join(pending)), names[i]]
                pending = []
            elif i in self._tokens:
                pending.append(self._tokens[i])
            else:
                raise InputError(f"CLIP tokenizer: id {i} is not in the vocabulary of {self.vocabulary.source}")
        out.append(from_symbols("".join(pending)))
        return "".join(out).replace(END_OF_WORD, " ")
