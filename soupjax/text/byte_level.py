"""The byte-level alphabet of CLIP's BPE (the one GPT-2 introduced): every UTF-8 byte as one printable
character, so that any text, emoji included, is spelled with 256 symbols and never needs an unknown token.

Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, DEL, the C1 range,
no-break space and soft hyphen) are moved, in byte order, to U+0100 onwards so that no symbol is
whitespace. The order of ``BYTE_TO_SYMBOL`` is also the order of the first 256 ids of CLIP's vocabulary.
"""
from __future__ import annotations


def _symbols_in_vocabulary_order() -> dict[int, str]:
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    kept = set(printable)
    moved = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + k) for k, b in enumerate(moved)})
    return table


# byte value -> its symbol; insertion order is the vocabulary order of the byte symbols
BYTE_TO_SYMBOL: dict[int, str] = _symbols_in_vocabulary_order()
SYMBOL_TO_BYTE: dict[str, int] = {symbol: b for b, symbol in BYTE_TO_SYMBOL.items()}
# The suffix CLIP's BPE puts on the last symbol of a word, so "a</w>" (a word's end) and "a" are two tokens.
END_OF_WORD = "</w>"


def to_symbols(text: str) -> str:
    """``text`` as UTF-8 bytes, each written as its byte-level symbol."""
    return "".join(BYTE_TO_SYMBOL[b] for b in text.encode("utf-8"))


def from_symbols(symbols: str) -> str:
    """The inverse of ``to_symbols``; bytes that are not valid UTF-8 become U+FFFD."""
    return bytes(SYMBOL_TO_BYTE[s] for s in symbols).decode("utf-8", errors="replace")
