"""Text for CLIP's text tower: its tokenizer, read offline from the files that come with a checkpoint.

    clip_tokenizer.py   ClipTokenizer (from_path, tokenize, encode, decode) and clean_text: open_clip's
                        cleaning, word pattern, BPE and 77-token rows, token for token
    bpe_files.py        find_tokenizer_files beside/inside a checkpoint, and the readers of OpenAI's
                        bpe_simple_vocab_16e6.txt.gz, Hugging Face's vocab.json + merges.txt and
                        tokenizer.json into one checked BpeVocabulary
    byte_level.py       the 256 byte symbols byte-level BPE spells text with
"""
