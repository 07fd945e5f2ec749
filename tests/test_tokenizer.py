"""Sentencepiece tokenizer: trained on real text, round-trips code exactly, fixed special ids."""

import pickle
import re

import pytest

from support import stdlib_documents
from raylm.errors import DataError
from raylm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = stdlib_documents(max_bytes=400_000)
    return Tokenizer.train((d.text for d in docs), 1024, max_bytes=400_000)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn  x ** 2  # squared\n\n\n",
        "    indented\n        twice\n",
        "unicode: héllo wörld 世界 🙂 \u00a0nbsp",
        "",
        "trailing spaces   ",
    ],
)
def test_decode_of_encode_is_identity(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode_one(text)) == text


def test_batch_encode_matches_single_and_special_ids_are_fixed(tokenizer):
    texts = ["import os", "x = 1\n", "class A:\n    pass"]
    assert tokenizer.encode(texts) == [tokenizer.encode_one(t) for t in texts]
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert tokenizer.sp.id_to_piece(BOS_ID) == "<s>" and tokenizer.sp.id_to_piece(EOS_ID) == "</s>"
    assert tokenizer.vocab_size <= 1024
    ids = [i for t in texts for i in tokenizer.encode_one(t)]
    assert UNK_ID not in ids  # byte fallback: nothing is unknown


def test_save_load_and_pickle_keep_the_same_model(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok" / "tokenizer.model")
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.sha256 == tokenizer.sha256 and clone.encode_one("for i in range(3):") == tokenizer.encode_one(
        "for i in range(3):"
    )


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(junk)


@pytest.mark.parametrize("vocab_size,byte_fallback", [(300, True), (60, False)])
def test_vocab_too_small_for_the_sample_characters_is_one_line_naming_the_size_that_fits(vocab_size, byte_fallback):
    """sentencepiece needs a piece per covered character on top of its fixed pieces (with byte
    fallback 262: 4 special, newline, tab, 256 bytes), whatever hard_vocab_limit says; too few is a
    one-line DataError naming model.vocab_size and the size that trains (the stdlib's code has
    more than 40 distinct characters, so 300 and 60 are too few)."""
    texts = [d.text for d in stdlib_documents(max_bytes=200_000)]
    with pytest.raises(DataError) as raised:
        Tokenizer.train(texts, vocab_size, byte_fallback=byte_fallback, max_bytes=200_000)
    message = str(raised.value)
    assert "\n" not in message and "trainer_interface" not in message
    assert message.startswith(f"model.vocab_size={vocab_size} is too small for the ")
    needed = int(re.search(r"raise model.vocab_size to at least (\d+) or lower tokenizer.character_coverage", message)[1])
    assert needed > vocab_size
    assert Tokenizer.train(texts, needed, byte_fallback=byte_fallback, max_bytes=200_000).vocab_size == needed


def test_character_coverage_sentencepiece_refuses_is_one_line():
    with pytest.raises(DataError, match=r"^tokenizer training failed .*character_coverage=0\.5 .*>= 0\.98[^\n]*$"):
        Tokenizer.train(["some text"] * 10, 300, character_coverage=0.5)
