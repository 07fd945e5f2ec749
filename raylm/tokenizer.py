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
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from raylm import storage
from raylm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from raylm.config import Config

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
HF_PREFIX = "hf:"
"""`model.init_from: hf:DIR` names a Hugging Face Llama directory (`raylm.train.hf_import`)."""
_MAX_SENTENCE_CHARS = 8192


class Tokenizer:
    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = model_proto
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a local file or an object-storage URI."""
        try:
            with storage.errors(path, None, DataError):
                data = storage.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"{path}: tokenizer model not found") from None
        try:
            return cls(data, source=str(path))
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
        user_symbols = ["\n", "\t"]
        try:
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
                user_defined_symbols=user_symbols,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                hard_vocab_limit=False,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece's failed CHECKs: the settings do not fit this sample
            fixed_pieces = 4 + len(user_symbols) + (256 if byte_fallback else 0)
            raise DataError(_training_error(str(e), chunks, vocab_size, character_coverage, fixed_pieces)) from None
        return cls(out.getvalue())

    def save(self, path: str | Path) -> str | Path:
        """To a local file or an object-storage URI, whole or not at all (a crash never leaves half a tokenizer)."""
        path = storage.location(path)
        storage.write_bytes(path, self._proto)
        self.source = str(path)
        return path

    def to_bytes(self) -> bytes:
        """The sentencepiece model file's bytes (what `save` writes)."""
        return self._proto

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


def sentencepiece_failure(message: str) -> tuple[str, int | None]:
    """(what a failed sentencepiece training check says, in one line without its flags; the
    vocabulary size it needed when the check is "vocabulary smaller than required_chars", else None).

    The one place raylm reads sentencepiece's text: its binding raises a bare RuntimeError that
    carries the C++ CHECK's message and no fields, e.g.
    "INTERNAL: src/trainer_interface.cc(638) [<check>] Vocabulary size is smaller than
    required_chars. 300 vs 570. Increase vocab_size or decrease character_coverage with
    --character_coverage option." tests/test_reader_errors.py fails if that wording changes."""
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    check = re.match(r"[A-Z_]+: \S+\(\d+\) \[(.*?)\] ?(.*)", first)
    detail = (check.group(2) or f"check failed: {check.group(1)}") if check else first
    detail = detail.split(" Increase vocab_size")[0].rstrip(". ")
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", detail)
    return detail, int(too_small.group(1)) if too_small else None


def _training_error(message: str, chunks: list[str], vocab_size: int, character_coverage: float,
                    fixed_pieces: int) -> str:
    """One line for a sentencepiece training failure, in config keys rather than its flags and C++ checks."""
    detail, needed = sentencepiece_failure(message)
    if needed is None:  # e.g. tokenizer.character_coverage outside [0.98, 1]
        return (f"tokenizer training failed with model.vocab_size={vocab_size}, "
                f"tokenizer.character_coverage={character_coverage} (sentencepiece: {detail})")
    characters = len(set().union(*map(set, chunks)))
    fixed = f"special, newline, tab{', 256 bytes' if fixed_pieces > 256 else ''}"
    return (f"model.vocab_size={vocab_size} is too small for the {characters:,} distinct characters of the "
            f"tokenizer sample (sentencepiece: {detail}; {needed} = {fixed_pieces} fixed pieces ({fixed}) + "
            f"{needed - fixed_pieces} characters); raise model.vocab_size to at least {needed} or lower "
            f"tokenizer.character_coverage={character_coverage} (0.98 at the least)")


def load_or_train(cfg: Config, sample: Callable[[], Iterable[str]], log: Callable[[str], None] = print,
                  *keep: str | Path | None) -> Tokenizer:
    """The one load-or-train: tokenizer.path, else the first existing file of `keep` (a resumed
    checkpoint's tokenizer, the prepared data's), else the tokenizer of `model.init_from` (an HF
    directory's, or a raylm run's or checkpoint's: continued pretraining and fine-tuning keep
    the vocabulary the weights were trained with), else a new one
    trained on `sample()`."""
    t = cfg.tokenizer
    existing = next((p for p in keep if p is not None and storage.is_file(p)), None)
    if t.path is not None:
        tokenizer = Tokenizer.load(t.path)
    elif existing is not None:
        tokenizer = Tokenizer.load(existing)
    elif cfg.model.init_from.startswith(HF_PREFIX):
        tokenizer = Tokenizer.load(hf_tokenizer_path(hf_dir_of(cfg.model.init_from)))
    elif cfg.model.init_from:
        tokenizer = Tokenizer.load(_init_run_tokenizer(cfg.model.init_from))
    else:
        log(f"training a {t.model_type} tokenizer with {cfg.model.vocab_size} pieces ...")
        tokenizer = Tokenizer.train(
            sample(), cfg.model.vocab_size, model_type=t.model_type, byte_fallback=t.byte_fallback,
            character_coverage=t.character_coverage, max_piece_length=t.max_piece_length, max_bytes=t.sample_bytes,
        )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    return tokenizer


def hf_dir_of(init_from: str) -> Path:
    """DIR of `model.init_from: hf:DIR`."""
    if not init_from.startswith(HF_PREFIX) or len(init_from) == len(HF_PREFIX):
        raise ConfigError(f"model.init_from={init_from!r}: must be hf:DIR (a Hugging Face Llama directory)")
    return Path(init_from[len(HF_PREFIX):]).expanduser()


def hf_tokenizer_path(hf_dir: str | Path) -> Path:
    """The sentencepiece model of an HF directory, for a run that continues its training."""
    path = Path(hf_dir) / "tokenizer.model"
    if not path.is_file():
        raise ConfigError(f"model.init_from=hf:{hf_dir}: no sentencepiece tokenizer.model there; "
                          "set tokenizer.path to the model's sentencepiece tokenizer")
    return path

def _init_run_tokenizer(init_from: str) -> str | Path:
    """tokenizer.model of the raylm run or checkpoint `model.init_from` names (each holds one;
    a checkpoint of an older run may hold it only in its run directory)."""
    where = storage.location(init_from) if storage.is_uri(init_from) else Path(init_from).expanduser()
    for folder in (where, storage.parent_of(where)):
        candidate = storage.child(folder, "tokenizer.model")
        if storage.is_file(candidate):
            return candidate
    raise DataError(f"model.init_from={init_from}: no tokenizer.model there (a raylm run or checkpoint "
                    "directory holds one); set tokenizer.path to the tokenizer its model was trained with")


def _training_chunks(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut documents at line ends into chunks sentencepiece accepts, until max_bytes."""
    total = 0
    for text in texts:
        if text.startswith("\0"):  # a supervised document: its segments joined (`raylm.data.parse.plain_text`)
            text = text.replace("\0", "")
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
