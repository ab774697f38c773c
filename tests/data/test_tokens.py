import json
import os
import re
from pathlib import Path

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
        # was silently ignored
        (dict(vocab_size=1000), "vocab_size=1000 applies to the BPE tokenizer only"),
        # 10^9 aborted the process in the tokenizers trainer (Rust out of memory, exit 134)
        (dict(tokenizer="bpe", vocab_size=10**9), "vocab_size=1000000000: expected a BPE vocabulary"),
        (dict(tokenizer="bpe", vocab_size=2**20 + 1), "at most 2^20 = 1,048,576"),
        (dict(tokenizer="bpe", vocab_size=True), "vocab_size=True"),
        (dict(tokenizer="bpe", vocab_size=256), "at least 257"),
    ],
)
def test_prepare_refuses_bad_options(tmp_path, kwargs, match):
    path, _ = _write_text(tmp_path)
    with pytest.raises(UserError, match=re.escape(match)):
        prepare([path], tmp_path / "tok", **kwargs)


def test_bpe_tokenizer_json_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    from steplaw.data import tokenizers

    written = []
    real = tokenizers.write_atomic

    def spy(path, data):
        written.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(tokenizers, "write_atomic", spy)
    path, text = _write_text(tmp_path)
    prepare([path], tmp_path / "tok", tokenizer="bpe", vocab_size=2**20)  # the largest: trains in well under 1 s
    assert "tokenizer.json" in written
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode(text[:200])) == text[:200]
    assert not list((tmp_path / "tok").glob(".*.tmp"))


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


def _token_dir(path, ids, vocab, claimed_vocab=None):
    path.mkdir()
    for split in ("train", "val"):
        write_token_file(path / f"{split}.bin", ids, vocab)
        if claimed_vocab is not None:
            sidecar = path / f"{split}.json"
            sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "vocab_size": claimed_vocab}))
    return path


def test_ids_beyond_the_vocabulary_are_refused(tmp_path):
    """A token file whose ids do not fit its sidecar's vocabulary would index past the
    embedding (a crash on GPU): refused in one sentence when the data is loaded."""
    ids = np.arange(5000) % 700
    with pytest.raises(UserError, match=r"holds token id 699, outside its vocabulary of 256 tokens"):
        load_token_data(_token_dir(tmp_path / "bad", ids, 1000, claimed_vocab=256))
    assert load_token_data(_token_dir(tmp_path / "good", ids, 1000)).vocab_size == 1000


def test_rewritten_token_file_is_checked_again(tmp_path):
    directory = _token_dir(tmp_path / "tok", np.arange(4096) % 256, 256)
    load_token_data(directory)  # checked, and the answer cached
    bad = (np.arange(4096) % 256).astype("<u2")
    bad[100] = 300
    (directory / "train.bin").write_bytes(bad.tobytes())
    os.utime(directory / "train.bin", ns=(1, 1))  # a new mtime even on coarse clocks
    with pytest.raises(UserError, match="holds token id 300"):
        load_token_data(directory)


def test_write_token_file_refuses_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(UserError, match=r"do not fit the vocabulary of 256"):
        write_token_file(tmp_path / "x.bin", np.array([1, 256]), 256)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_token_files_are_written_whole(tmp_path):
    write_token_file(tmp_path / "x.bin", np.arange(10), 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.json"]  # no temporary files left


def test_data_path_mistakes(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file: expected the directory"):
        load_token_data(tmp_path / "file")
    with pytest.raises(UserError, match="is a directory: expected a UTF-8 text file"):
        prepare([tmp_path], tmp_path / "tok")
    path, _ = _write_text(tmp_path)
    with pytest.raises(UserError, match="is a file: expected a directory"):
        prepare([path], tmp_path / "file")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\u00efve caf\u00e9".encode("latin-1") * 1000)
    with pytest.raises(UserError, match="is not UTF-8 text"):
        prepare([latin], tmp_path / "tok2")


def test_corpus_does_not_import_tokens():
    """One-way: steplaw.data.tokens uses the corpus (and its block split), never back,
    not even from inside a function."""
    import ast

    import steplaw.data.corpus as corpus

    tree = ast.parse(open(corpus.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("steplaw.data")}
