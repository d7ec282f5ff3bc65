"""The tokenizer's side of a chat's text: tokenizing a rendering in which literal special-token text (a message
quoting `<|im_end|>`) is marked, so that text becomes ordinary characters while the template's own markers stay
tokens; and the check that the ids of every row decode to the template's rendering."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from fttool.errors import UserError

Span = Tuple[int, int]
# Private-use characters (plane 15) that no dataset contains: they mark literal special-token text in data.
LIT_OPEN, LIT_CLOSE = "\U000f0000", "\U000f0001"
MARKED_RE = re.compile(f"{LIT_OPEN}(.*?){LIT_CLOSE}|[{LIT_OPEN}{LIT_CLOSE}]", re.S)


def common(a: str, b: str) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str) -> int:
    return common(a[::-1], b[::-1])


class TokenText:
    """One tokenizer's encoding of marked text, and its decoding checked against the rendering."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoder = tokenizer.added_tokens_decoder.values()
        # whitespace a template marker swallows when tokenized (phi-3's rstrip): gone from the ids
        self.strips = {t.content: (t.lstrip, t.rstrip) for t in decoder if t.lstrip or t.rstrip}
        self._lossless: Optional[bool] = None

    @property
    def lossless(self) -> bool:
        """Whether this tokenizer gives back exactly the text it was given (byte-level BPE does; a SentencePiece
        tokenizer turns '▁' into a space and may drop a leading space)."""
        if self._lossless is None:
            probe = " lead  two\n\n\tx ▁é 中文 😀 {{x}} </s"
            ids = self.tok(probe, add_special_tokens=False)["input_ids"]
            self._lossless = self.decode(ids) == probe
        return self._lossless

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def expected_text(self, text: str) -> str:
        """The text the training ids must decode to: the rendering (literal special-token text unmarked, an appended
        EOS included), less the whitespace that a template marker with lstrip/rstrip swallows when tokenized."""
        if not self.strips:
            return unmark(text)
        out, at = [], 0
        for m in list(MARKED_RE.finditer(text)) + [None]:
            out.append(self._swallow(text[at : m.start() if m else len(text)]))
            if m is not None and m.group(1) is not None:
                out.append(m.group(1))
            at = m.end() if m else len(text)
        return "".join(out)

    def _swallow(self, piece: str) -> str:
        for tok, (left, right) in self.strips.items():
            if tok in piece:
                if right:
                    piece = re.sub(f"({re.escape(tok)})\\s+", r"\1", piece)
                if left:
                    piece = re.sub(f"\\s+({re.escape(tok)})", r"\1", piece)
        return piece

    def check(self, loc: str, text: str, ids: List[int]) -> None:
        """The training ids decode to the template's rendering, byte for byte (less what the tokenizer's own
        whitespace rules drop next to its markers). On a tokenizer that is not lossless, the texts are compared
        without whitespace (its decoder cannot tell where it was). A row that breaks this is refused."""
        want, got = self.expected_text(text), self.decode(ids)
        if not self.lossless:
            want, got = _no_space(self.decode(self.tok(want, add_special_tokens=False)["input_ids"])), _no_space(got)
        if want == got:
            return
        k = common(want, got)
        raise UserError(
            f"{loc}: the training tokens would decode to other text than the chat template renders, at character "
            f"{k}: {want[max(0, k - 24) : k + 24]!r} rendered, {got[max(0, k - 24) : k + 24]!r} tokenized. "
            "This happens around special-token text quoted in a message; remove it from the row "
            "(or data.skip_bad_rows=true)."
        )

    def encode_marked(self, loc: str, text: str, spans: List[Span]) -> Tuple[list, list, List[Span]]:
        """Tokenize a text whose literal special-token text is marked: the marked pieces as ordinary characters, the
        rest as usual (the template's own markers stay tokens). Offsets and spans come back in the unmarked text."""
        pieces: List[Tuple[str, bool]] = []  # (text, as plain characters)
        removed: List[Tuple[int, int]] = []  # (position in the marked text, marker characters removed up to there)
        at, gone = 0, 0
        for m in MARKED_RE.finditer(text):
            pieces.append((text[at : m.start()], False))
            if m.group(1) is not None:
                pieces.append((m.group(1), True))
                removed += [(m.start() + 1, gone + 1), (m.end(), gone + 2)]
                gone += 2
            else:  # a lone marker left by a template's string operations: dropped, still a piece boundary
                gone += 1
                removed.append((m.end(), gone))
            at = m.end()
        pieces.append((text[at:], False))

        def clean(p: int) -> int:
            shift = 0
            for pos, g in removed:
                if pos <= p:
                    shift = g
            return p - shift

        ids, offs, base = [], [], 0
        for _k, (piece, as_text) in enumerate(pieces):
            if not piece:
                continue
            x, o = self.encode_piece(piece, as_text, first=base == 0)
            if as_text and self.tok.convert_tokens_to_ids(piece) in x:
                raise UserError(
                    f"{loc}: the text {piece!r} in a message cannot be kept as plain text: this tokenizer "
                    "makes the special token from its characters. Remove it from the data "
                    "(or data.skip_bad_rows=true)."
                )
            ids += x
            offs += [(a + base, b + base) for a, b in o]
            base += len(piece)
        return ids, offs, [(clean(s), clean(e)) for s, e in spans]

    def encode_piece(self, piece: str, as_text: bool, first: bool) -> Tuple[list, list]:
        """Ids and offsets of one piece of a chat. Pieces after the first are encoded after a newline, which is then
        removed, so a SentencePiece tokenizer does not add the space it adds at the start of a text."""

        def enc(s):
            out = self.tok(s, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
            return out["input_ids"], out["offset_mapping"]

        if not first:
            nl, _ = enc("\n")
            x, o = enc("\n" + piece)
            if x[: len(nl)] == nl:
                return x[len(nl) :], [(max(0, a - 1), max(0, b - 1)) for a, b in o[len(nl) :]]
        return enc(piece)


def unmark(text: str) -> str:
    """The text without fttool's private markers around literal special-token text."""
    return text.replace(LIT_OPEN, "").replace(LIT_CLOSE, "")


def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text.replace("\u2581", " "))
