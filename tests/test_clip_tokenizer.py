"""soupjax.text: CLIP's tokenizer, token for token against open_clip's and against transformers'.

References, all offline: open_clip's ``tokenize`` and ``SimpleTokenizer`` over the
``bpe_simple_vocab_16e6.txt.gz`` the installed open_clip ships; transformers' ``CLIPTokenizer`` and
``CLIPTokenizerFast`` over ``vocab.json``/``merges.txt`` and ``tokenizer.json`` files this test writes from
that same vocabulary (open_clip's ids, Hugging Face's special-token names). Texts: OpenAI's 80 ImageNet
templates and 1000 class names as open_clip ships them, and hand-picked unicode, accents, emoji, HTML
entities, numbers, punctuation, contractions, whitespace, the empty string and texts over 77 tokens.

What differs between open_clip and transformers (5.x; measured here, each asserted in
``test_where_transformers_differs_from_open_clip`` with its example):
  * transformers 5 has one CLIP tokenizer (``CLIPTokenizerFast is CLIPTokenizer``, the Rust ``tokenizers``
    backend); its normalizer is NFC, whitespace runs to one space, lower case: no ftfy, no HTML unescape.
    (transformers 4's slow Python tokenizer ran ``ftfy.fix_text`` when ftfy was installed, but never
    unescaped HTML.) So HTML entities, curly quotes, mojibake, ligatures, full-width letters, control
    characters, terminal escapes and byte-order marks tokenize differently;
  * Python's ``str.lower`` writes a word-final capital sigma as ς, transformers' lowercase as σ;
  * open_clip's word pattern is case-insensitive, so "'ſ" (long s) is a contraction there and not in
    transformers;
  * special tokens spelled in the text: open_clip turns "<end_of_text>" into the token and splits
    "<|endoftext|>", transformers the other way round;
  * padding: transformers pads with end-of-text (49407) and an attention mask, open_clip with zeros.
Everything else, the templates and class names included, is equal token for token.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even by accident

import numpy as np
import pytest

from soupjax.cli.errors import InputError
from soupjax.text.bpe_files import find_tokenizer_files, read_hf_tokenizer_json
from soupjax.text.clip_tokenizer import ClipTokenizer, clean_text

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
zero_shot_metadata = pytest.importorskip("open_clip.zero_shot_metadata")
transformers = pytest.importorskip("transformers")

HF_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
LONG = " ".join(zero_shot_metadata.IMAGENET_CLASSNAMES[:60])  # ~150 tokens
# Hand-picked texts on which open_clip and transformers agree.
AGREED = [
    "", " ", "a photo of a cat.", "A PHOTO OF A CAT.", "  extra   spaces\tand\nnewlines \r\n ",
    "café crème brûlée, naïve façade, Ångström, São Paulo, Zürich, Łódź", "İstanbul", "straße ß",
    "日本語のテキスト", "中文文本", "한국어", "Ελληνικά", "русский текст", "עברית", "العربية", "हिन्दी",
    "emoji 😀🐈‍⬛👍🏽 🇫🇷 ❤️", "1234567890 3.14159 -42 1,000,000 2nd 10% $5 €3 ²³ ①",
    "Hello, world! What's up? (yes) [no] {maybe} <tag> a/b a\\b a|b ~ ` @ # ^ * _ + = ;:",
    "it's don't I'm you're we've they'll he'd IT'S DON'T", "ellipsis… em—dash – quotes ' \"",
    "tab\there", "zero\u200bwidth", "soft\u00adhyphen", "x\u2028y", "\u00a0no-break", "Kelvin \u212a",
    "e\u0301 (combining acute)", "a" * 300, "the " * 100, LONG,
]
# (text, what transformers does differently): open_clip and soupjax agree, transformers differs.
DIFFERENT = [
    ("Tom &amp; Jerry", "HTML entity not unescaped"),
    ("&amp;amp;", "double-escaped entity: open_clip unescapes twice"),
    ("5 &gt; 3 &lt;b&gt;", "HTML entities not unescaped"),
    ("don’t", "curly apostrophe kept (ftfy uncurls it)"),
    ("“quoted”", "curly quotes kept"),
    ("cafÃ©", "mojibake kept (ftfy repairs it to café)"),
    ("ﬁsh", "ligature kept (ftfy splits it)"),
    ("ＡＢＣ ｈｅｌｌｏ", "full-width letters kept (ftfy makes them ASCII)"),
    ("ǅ", "titlecase digraph kept (ftfy splits it)"),
    ("a\x00b", "control character kept (ftfy removes it)"),
    ("\x1b[31mred", "terminal escape kept (ftfy removes it)"),
    ("\ufeffbom", "byte-order mark kept (ftfy removes it)"),
    ("ΣΑΣ", "final sigma lower-cased to σ, Python gives ς"),
    ("'ſ", "case-sensitive pattern: not a contraction"),
    ("<end_of_text>", "open_clip's special name is text to transformers"),
    ("<|endoftext|>", "transformers' special name is a token to it, text to open_clip"),
]


def _templates_and_classes() -> list[str]:
    """Every class name alone, and once in a template (each of the 80 templates 12 or 13 times)."""
    templates = zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    classes = zero_shot_metadata.IMAGENET_CLASSNAMES
    assert len(templates) == 80 and len(classes) == 1000
    return list(classes) + [templates[i % len(templates)](c) for i, c in enumerate(classes)]


@pytest.fixture(scope="module")
def bpe_gz():
    return open_clip_tokenizer.default_bpe()


@pytest.fixture(scope="module")
def reference():
    """open_clip's own tokenizer, as its reference: its vocabulary and merges in its order."""
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, reference):
    """Hugging Face's three layouts of open_clip's vocabulary: vocab.json + merges.txt, tokenizer.json with
    [a, b] merges (as transformers saves it) and with "a b" merges (as older hub files hold them)."""
    root = tmp_path_factory.mktemp("hf")
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    slow = root / "vocab_merges"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps({HF_NAMES.get(t, t): i for t, i in reference.encoder.items()}))
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    pairs, strings = root / "json_pairs", root / "json_strings"
    pairs.mkdir(), strings.mkdir()
    transformers.CLIPTokenizer.from_pretrained(str(slow)).backend_tokenizer.save(str(pairs / "tokenizer.json"))
    data = json.loads((pairs / "tokenizer.json").read_text())
    assert isinstance(data["model"]["merges"][0], list)
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (strings / "tokenizer.json").write_text(json.dumps(data))
    return {"vocab_merges": slow, "json_pairs": pairs, "json_strings": strings}


@pytest.fixture(scope="module")
def ours(bpe_gz):
    return ClipTokenizer.from_path(bpe_gz)


def _hf_rows(tokenizer, texts, context_length=77) -> np.ndarray:
    """transformers' ids as open_clip lays them out: padding (end-of-text there) set to zero."""
    enc = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True)
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    assert (ids[mask == 0] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 49407
    return np.where(mask == 1, ids, 0)


def test_equals_open_clip_on_templates_classes_and_hand_picked_texts(ours):
    texts = _templates_and_classes() + AGREED + [text for text, _ in DIFFERENT]
    got = ours.tokenize(texts)
    want = open_clip_tokenizer.tokenize(texts).numpy()
    assert got.dtype == np.int32 and got.shape == (len(texts), 77)
    bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
    assert not bad, f"{len(bad)} texts differ from open_clip, e.g. {bad[:3]!r}"
    # the single-string form, the empty string, and a text cut to 77 ending in end-of-text
    np.testing.assert_array_equal(ours.tokenize("a photo of a cat."), open_clip_tokenizer.tokenize("a photo of a cat."))
    np.testing.assert_array_equal(ours.tokenize("")[0, :3], [49406, 49407, 0])
    long_row = ours.tokenize(LONG)[0]
    assert len(ours.encode(LONG)) > 75 and long_row[-1] == 49407 and (long_row != 0).all()


@pytest.mark.parametrize("context_length", [2, 5, 16, 100])
def test_other_context_lengths_truncate_as_open_clip(ours, reference, context_length):
    texts = ["a photo of a cat.", LONG, "", "emoji 😀🐈‍⬛"]
    np.testing.assert_array_equal(ours.tokenize(texts, context_length=context_length),
                                  reference(texts, context_length=context_length).numpy())


def test_every_file_layout_gives_the_same_tokens(ours, hf_dirs, tmp_path):
    texts = _templates_and_classes()[::7] + AGREED + [text for text, _ in DIFFERENT]
    want = ours.tokenize(texts)
    for name, folder in hf_dirs.items():
        other = ClipTokenizer.from_path(folder)
        assert (other.start_id, other.end_id, other.vocab_size) == (49406, 49407, 49408), name
        np.testing.assert_array_equal(other.tokenize(texts), want, err_msg=name)
    found = find_tokenizer_files(hf_dirs["json_pairs"])
    assert found.kind == "hf_tokenizer_json"
    assert read_hf_tokenizer_json(found.paths[0]).merges == ours.vocabulary.merges


@pytest.mark.parametrize("layout", ["vocab_merges", "json_pairs", "json_strings"])
def test_equals_transformers_where_the_cleaning_agrees(ours, hf_dirs, layout):
    texts = _templates_and_classes() + AGREED
    cls = transformers.CLIPTokenizer if layout == "vocab_merges" else transformers.CLIPTokenizerFast
    hf = cls.from_pretrained(str(hf_dirs[layout]))
    got, want = ours.tokenize(texts), _hf_rows(hf, texts)
    bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
    assert not bad, f"{len(bad)} texts differ from transformers' {cls.__name__} ({layout}), e.g. {bad[:3]!r}"
    np.testing.assert_array_equal(ours.tokenize([LONG], 16), _hf_rows(hf, [LONG], 16))


def test_where_transformers_differs_from_open_clip(ours, hf_dirs):
    """The findings of the module docstring, each with its example."""
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer  # transformers 5: one tokenizer
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_dirs["vocab_merges"]))
    texts = [text for text, _ in DIFFERENT]
    got, theirs = ours.tokenize(texts), _hf_rows(hf, texts)
    np.testing.assert_array_equal(got, open_clip_tokenizer.tokenize(texts).numpy())
    same = [f"{text!r} ({why})" for (text, why), a, b in zip(DIFFERENT, got, theirs) if (a == b).all()]
    assert not same, f"transformers now agrees with open_clip on {same}: update the findings"
    assert clean_text("Tom &amp;amp; Jerry ’s") == "tom & jerry 's"
    assert hf("x", padding="max_length", max_length=5)["input_ids"] == [49406, 343, 49407, 49407, 49407]


def test_decode_round_trip(ours):
    row = ours.tokenize("Café, 😀 don't  stop")[0]
    assert ours.decode(row[: int(np.argmax(row == 49407)) + 1]) == "<start_of_text>café , 😀 don 't stop <end_of_text>"


def test_finds_the_files_beside_or_inside_a_checkpoint(bpe_gz, hf_dirs, tmp_path):
    beside = tmp_path / "openai"
    beside.mkdir()
    (beside / "ViT-B-32.pt").write_bytes(b"not read")
    shutil.copy(bpe_gz, beside / "bpe_simple_vocab_16e6.txt.gz")
    assert find_tokenizer_files(beside / "ViT-B-32.pt").kind == "openai_bpe"
    nested = tmp_path / "hf_checkpoint"
    shutil.copytree(hf_dirs["vocab_merges"], nested / "tokenizer")
    (nested / "config.json").write_text("{}")
    assert find_tokenizer_files(nested).kind == "hf_vocab_merges"
    assert find_tokenizer_files(nested / "config.json").kind == "hf_vocab_merges"
    assert find_tokenizer_files(nested / "tokenizer" / "merges.txt").paths[0].name == "vocab.json"
    both = tmp_path / "both"
    shutil.copytree(hf_dirs["vocab_merges"], both)
    shutil.copy(hf_dirs["json_pairs"] / "tokenizer.json", both)
    assert find_tokenizer_files(both).kind == "hf_tokenizer_json"  # tokenizer.json first
    assert find_tokenizer_files(both / "vocab.json").kind == "hf_vocab_merges"  # the file named is used


def _refused(path, *patterns):
    with pytest.raises(InputError) as e:
        ClipTokenizer.from_path(path)
    message = str(e.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_refuses_missing_files(tmp_path, hf_dirs):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _refused(tmp_path / "model.safetensors", str(tmp_path), str(tmp_path / "tokenizer"), "tokenizer.json",
             "vocab.json", "merges.txt", "bpe_simple_vocab_16e6.txt.gz")
    _refused(tmp_path / "nothing_here.pt", "does not exist")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(hf_dirs["vocab_merges"] / "vocab.json", half)
    _refused(half, "has no merges.txt")
    only_merges = tmp_path / "only_merges"
    only_merges.mkdir()
    shutil.copy(hf_dirs["vocab_merges"] / "merges.txt", only_merges)
    _refused(only_merges / "merges.txt", "has no vocab.json")


def test_refuses_wrong_files(tmp_path, reference, hf_dirs):
    vocab = json.loads((hf_dirs["vocab_merges"] / "vocab.json").read_text())
    merges_txt = (hf_dirs["vocab_merges"] / "merges.txt").read_text()

    def hf_pair(name, vocab_obj, merges_text=merges_txt):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "vocab.json").write_text(json.dumps(vocab_obj))
        (folder / "merges.txt").write_text(merges_text)
        return folder

    gpt2_like = {t: i for t, i in vocab.items() if t != "<|startoftext|>"}
    _refused(hf_pair("gpt2", gpt2_like), "no start-of-text token", "<|startoftext|>")
    no_word_ends = {t: i for t, i in vocab.items() if not (len(t) == 5 and t.endswith("</w>"))}
    _refused(hf_pair("word_ends", no_word_ends), "not CLIP's byte-level BPE", "byte symbols are missing")
    _refused(hf_pair("ids", {**vocab, "cat": "7"}), "token 'cat' has id '7'")
    _refused(hf_pair("three", vocab, "#version: 0.2\ni n\na b c\n"), "line 3 is not a merge")
    _refused(hf_pair("orphan", vocab, "i n\nzq zq\n"), "merge 1", "not in the vocabulary")
    _refused(hf_pair("not_dict", [1, 2]), "holds no vocabulary")

    data = json.loads((hf_dirs["json_pairs"] / "tokenizer.json").read_text())
    (tmp_path / "wordpiece.tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    _refused(tmp_path / "wordpiece.tokenizer.json", "WordPiece model", "BPE")
    data["model"]["merges"][5] = ["a", "b", "c"]
    (tmp_path / "bad_merge.tokenizer.json").write_text(json.dumps(data))
    _refused(tmp_path / "bad_merge.tokenizer.json", "model.merges[5] is not a merge")
    (tmp_path / "broken.tokenizer.json").write_text("{not json")
    _refused(tmp_path / "broken.tokenizer.json", "invalid JSON")

    (tmp_path / "plain.txt.gz").write_bytes(b"not gzip at all")
    _refused(tmp_path / "plain.txt.gz", "cannot read", "gzipped BPE merges")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("header\ni n\nt h\n")
    _refused(tmp_path / "short.txt.gz", "has 3 merge lines, CLIP needs 48894")
    with gzip.open(tmp_path / "garbled.txt.gz", "wt") as f:
        f.write("header\n" + "i n x\n" * 48894)
    _refused(tmp_path / "garbled.txt.gz", "line 2 is not a merge")


def test_refuses_bad_arguments(ours):
    for bad in (1, 0, True, 2.5):
        with pytest.raises(InputError, match="context_length must be an integer of at least 2"):
            ours.tokenize("a cat", context_length=bad)
    with pytest.raises(InputError, match=r"texts\[1\] is a bytes, expected a str"):
        ours.tokenize(["a cat", b"a dog"])
    with pytest.raises(InputError, match="id 99999 is not in the vocabulary"):
        ours.decode([320, 99999])
    assert ours.tokenize([]).shape == (0, 77)
