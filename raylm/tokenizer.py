"""Sentencepiece tokenizer: train from texts, save, load, batch encode/decode.

Settings are chosen so that decode(encode(text)) == text for any text, code included:
no Unicode normalisation, whitespace kept as it is (indentation matters in code), no dummy
prefix, newline and tab as user symbols, and byte fallback so that no character becomes
<unk>. Special ids are fixed: unk 0, bos 1, eos 2, pad 3. A tokenizer pickles as its model
bytes, so Ray can ship it to actors on any node without a shared file system.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from raylm.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_MAX_SENTENCE_CHARS = 8192


class Tokenizer:
    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = model_proto
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found")
        try:
            return cls(path.read_bytes(), source=str(path))
        except RuntimeError as e:  # sentencepiece reports a bad proto as RuntimeError
            raise DataError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        character_coverage: float = 0.9995,
        max_piece_length: int = 16,
        max_bytes: int = 4_000_000,
        num_threads: int = 2,
    ) -> Tokenizer:
        """Train on `texts` (documents; long ones are cut into chunks) up to `max_bytes` of text.

        hard_vocab_limit is off so a small corpus yields a smaller vocabulary instead of an
        error; the model's embedding may be larger than the tokenizer's vocabulary.
        """
        chunks = list(_training_chunks(texts, max_bytes))
        if not chunks:
            raise DataError("tokenizer training: the corpus sample holds no text")
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            max_sentencepiece_length=max_piece_length,
            max_sentence_length=_MAX_SENTENCE_CHARS * 4,  # bytes
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n", "\t"],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
        return cls(out.getvalue())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self._proto)
        tmp.replace(path)  # atomic: a crash never leaves half a tokenizer
        self.source = str(path)
        return path

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batch encode without BOS/EOS (packing adds them); uses sentencepiece's threads."""
        return self.sp.encode(texts, out_type=int)

    def encode_one(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int] | list[list[int]]) -> str | list[str]:
        return self.sp.decode(ids)

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["source"])


def _training_chunks(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut documents at line ends into chunks sentencepiece accepts, until max_bytes."""
    total = 0
    for text in texts:
        start = 0
        while start < len(text) and total < max_bytes:
            end = min(len(text), start + _MAX_SENTENCE_CHARS)
            if end < len(text):
                newline = text.rfind("\n", start, end)
                end = newline + 1 if newline > start else end
            chunk = text[start:end]
            start = end
            if chunk.strip():
                total += len(chunk.encode("utf-8", "replace"))
                yield chunk
        if total >= max_bytes:
            return
