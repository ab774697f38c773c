import json

import numpy as np
import pytest

from steplaw.data import load_token_data, prepare, read_token_file, write_token_file
from steplaw.data.corpus import corpus_bytes, corpus_split
from steplaw.data.tokenizers import ByteTokenizer, load_tokenizer
from steplaw.errors import UserError


def test_corpus_is_the_kjv_and_split():
    text = corpus_bytes()
    assert 3_500_000 < len(text) < 5_000_000
    assert text.startswith(b"Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    train, val = corpus_split()
    assert len(train) + len(val) == len(text)
    assert 0.03 < len(val) / len(text) < 0.07
    assert b"Revelation" in train and b"Genesis" in train


@pytest.mark.parametrize("vocab,dtype", [(256, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_token_file_round_trip(tmp_path, vocab, dtype):
    ids = np.random.default_rng(0).integers(0, vocab, size=1000)
    path = write_token_file(tmp_path / "x.bin", ids, vocab)
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta == {"dtype": dtype, "vocab_size": vocab, "tokens": 1000, "tokenizer": "byte"}
    assert path.stat().st_size == 1000 * np.dtype(dtype).itemsize  # headerless
    loaded, _ = read_token_file(path)
    np.testing.assert_array_equal(np.asarray(loaded), ids)


def test_truncated_token_file_refused(tmp_path):
    path = write_token_file(tmp_path / "x.bin", np.arange(100), 256)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="expected 200"):
        read_token_file(path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "In the beginning — was the Word ✓"
    assert tok.decode(tok.encode(text)) == text


def _write_text(tmp_path, n_chars=60_000):
    rng = np.random.default_rng(1)
    words = ["the", "lord", "said", "unto", "moses", "and", "behold", "light"]
    text = " ".join(rng.choice(words, size=n_chars // 5))
    path = tmp_path / "input.txt"
    path.write_text(text)
    return path, text


def test_prepare_bytes(tmp_path):
    path, text = _write_text(tmp_path)
    summary = prepare([path], tmp_path / "tok")
    data = load_token_data(tmp_path / "tok")
    assert data.vocab_size == 256
    assert summary["train_tokens"] + summary["val_tokens"] == len(text.encode())
    assert len(data.train) == summary["train_tokens"] and len(data.val) > 0
    assert load_tokenizer(tmp_path / "tok").decode(data.val[:50]) in text


def test_prepare_bpe(tmp_path):
    pytest.importorskip("tokenizers")
    path, text = _write_text(tmp_path)
    summary = prepare([path], tmp_path / "tok", tokenizer="bpe", vocab_size=300)
    data = load_token_data(tmp_path / "tok")
    assert data.vocab_size == summary["vocab_size"] <= 300
    assert summary["train_tokens"] < len(text) / 2  # merges compress the text
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(data.train[:40]) in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tokenizer="wordpiece"), "tokenizer"),
        (dict(val_fraction=0.9), "val_fraction"),
    ],
)
def test_prepare_refuses_bad_options(tmp_path, kwargs, match):
    path, _ = _write_text(tmp_path)
    with pytest.raises(UserError, match=match):
        prepare([path], tmp_path / "tok", **kwargs)


def test_prepare_refuses_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "tok")


def test_missing_data_dir_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_token_data(tmp_path / "nope")


def test_cli_prepare(tmp_path, capsys):
    from steplaw.cli import main

    path, _ = _write_text(tmp_path)
    assert main(["data", "prepare", str(path), "-o", str(tmp_path / "tok")]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "byte"
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "t2")]) == 2
