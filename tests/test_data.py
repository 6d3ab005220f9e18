"""Tests for kvshare_jax.data: TFDS text sources, tokenizer, packing, sharding, resume."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kvshare_jax import data
from kvshare_jax.config import default_config
from kvshare_jax.data import corpus

ENGLISH = (
    "The quick brown fox jumps over the lazy dog.\n"
    "    An indented line, with  two spaces and a tab\there.\n\n"
    "Unicode survives too: café, naïve, Ωmega, 東京.\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> data.Tokenizer:
    return _train_small()


def _train_small() -> data.Tokenizer:
    from kvshare_jax.data.tokenizer import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(data.EmbeddedSource("train"), 60), vocab_size=512)


def _docs(n: int, words: int = 40) -> list[dict[str, str]]:
    """Distinct English-ish documents of varying length."""
    vocab = "the cat sat on a mat and then it ran far away from home".split()
    return [
        {
            "text": f"Document {i}: "
            + " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(words + 13 * (i % 5)))
        }
        for i in range(n)
    ]


def _drain(it) -> list[dict[str, np.ndarray]]:
    return list(it)


def _rows(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    rows = [{k: b[k][r] for k in b} for b in batches for r in range(len(b["inputs"]))]
    return [r for r in rows if r["loss_mask"].any()]


def _stream(batches: list[dict[str, np.ndarray]]) -> list[int]:
    """The token stream the packed rows were cut from."""
    rows = _rows(batches)
    stream: list[int] = []
    for row in rows:
        stream += row["inputs"][: int(row["loss_mask"].sum())].tolist()
    last = rows[-1]
    return stream + [int(last["targets"][int(last["loss_mask"].sum()) - 1])]


def _cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = default_config().data
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------ TFDS sources


def _write_files(folder, texts: dict[str, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in texts.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)


def test_local_text_builder_round_trips_files_without_tensorflow(tmp_path):
    texts = {"a.txt": ENGLISH, "b.txt": "second\r\ndocument\n", "c.md": "third one"}
    _write_files(tmp_path / "txt", texts)
    builder = data.prepare_local_text(str(tmp_path / "txt"), str(tmp_path / "tfds"))
    assert builder.info.file_format == data.tfds_text.ARRAY_RECORD
    splits = {s: builder.as_data_source(split=s) for s in ("train", "validation")}
    assert (len(splits["train"]), len(splits["validation"])) == (2, 1)
    read = [data.TextSource(src)[i]["text"] for src in splits.values() for i in range(len(src))]
    assert sorted(read) == sorted(texts.values())
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None


def test_text_spec_opens_prepared_copy_and_reuses_it(tmp_path):
    _write_files(tmp_path / "txt", {f"{i}.txt": f"file number {i}" for i in range(4)})
    cfg = _cfg(dataset=f"text:{tmp_path}/txt/*.txt", tfds_data_dir=str(tmp_path / "tfds"))
    train, val = data.open_source(cfg, "train"), data.open_source(cfg, "validation")
    texts = {train[i]["text"] for i in range(len(train))} | {val[0]["text"]}
    assert texts == {f"file number {i}" for i in range(4)}
    versions = list((tmp_path / "tfds" / "local_text").glob("*/1.0.0"))
    assert len(versions) == 1
    mtime = versions[0].stat().st_mtime_ns
    data.open_source(cfg, "train")
    assert versions[0].stat().st_mtime_ns == mtime


def test_text_spec_needs_two_files(tmp_path):
    _write_files(tmp_path / "one", {"only.txt": "alone"})
    cfg = _cfg(dataset=f"text:{tmp_path}/one", tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="at least 2"):
        data.open_source(cfg, "train")


def test_named_dataset_is_read_from_prepared_array_record_files(tmp_path):
    _write_files(tmp_path / "txt", {f"{i}.txt": f"text {i}" for i in range(3)})
    builder = data.prepare_local_text(str(tmp_path / "txt"), str(tmp_path / "tfds"))
    name = f"local_text/{builder.builder_config.name}"
    source = data.open_source(_cfg(dataset=name, tfds_data_dir=str(tmp_path / "tfds")), "train")
    assert {source[i]["text"] for i in range(len(source))} <= {f"text {i}" for i in range(3)}
    with pytest.raises(ValueError, match="split 'test'"):
        data.open_source(_cfg(dataset=name, tfds_data_dir=str(tmp_path / "tfds")), "test")
    with pytest.raises(ValueError, match="no feature 'body'"):
        data.prepared_source(name, "train", str(tmp_path / "tfds"), text_key="body")
    info = builder.data_path / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(ValueError, match="needs TensorFlow"):
        data.prepared_source(name, "train", str(tmp_path / "tfds"))


def test_unprepared_named_dataset_raises_with_data_dir_and_recipe(tmp_path):
    cfg = _cfg(dataset="lm1b", tfds_data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="array_record") as e:
        data.open_source(cfg, "train")
    assert str(tmp_path / "empty") in str(e.value)


@pytest.mark.parametrize("spec", ["", "kaggle:foo", "bad name!", "text:"])
def test_unknown_dataset_spec_raises(spec, tmp_path):
    with pytest.raises(ValueError, match="spec|pattern"):
        data.open_source(_cfg(dataset=spec, tfds_data_dir=str(tmp_path)), "train")


# ------------------------------------------------------------------ embedded corpus


def _corpus_digest() -> str:
    """Digest of the split assignment and of the validation texts."""
    h = hashlib.sha256()
    for split in corpus.SPLITS:
        for title in corpus.document_titles(split):
            h.update(f"{split}/{title}\0".encode())
    h.update("\0".join(corpus.embedded_documents("validation")).encode())
    return h.hexdigest()


def test_embedded_corpus_is_english_and_split_is_deterministic():
    train, val = corpus.document_titles("train"), corpus.document_titles("validation")
    assert not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    text = "\n".join(corpus.embedded_documents("train"))
    assert len(text) > 1_000_000
    words = text.lower().split()
    for common in ("the", "of", "and", "is", "to"):
        assert words.count(common) / len(words) > 0.005, common
    assert data.EmbeddedSource("validation")[0]["text"] == corpus.document(val[0])
    code = "import tests.test_data as t; print(t._corpus_digest())"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert other.stdout.strip() == _corpus_digest()
    with pytest.raises(ValueError, match="unknown split"):
        data.EmbeddedSource("test")


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_text(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == ENGLISH
    assert tokenizer.decode(np.asarray(ids, np.int32)) == ENGLISH
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert pickle.loads(pickle.dumps(tokenizer)).encode(ENGLISH) == ids


def test_tokenizer_training_is_deterministic_and_saved_once(tmp_path, tokenizer):
    assert _train_small().model_proto == tokenizer.model_proto
    path = tmp_path / "sub" / "tok.model"
    texts = corpus.embedded_documents("train")[:60]
    first = data.train_or_load_tokenizer(texts, 512, str(path))
    assert path.read_bytes() == first.model_proto
    assert os.listdir(path.parent) == ["tok.model"]  # No temporary file left behind.
    again = data.train_or_load_tokenizer(["ignored"], 512, str(path))
    assert again.model_proto == first.model_proto


def test_get_tokenizer_trains_in_workdir_then_rejects_larger_vocab(tmp_path):
    cfg = _cfg(vocab_size=512, tokenizer_train_docs=40)
    tok = data.get_tokenizer(cfg, str(tmp_path))
    assert (tmp_path / "tokenizer.model").exists()
    assert tok.vocab_size <= 512
    given = _cfg(vocab_size=512, tokenizer_path=str(tmp_path / "tokenizer.model"))
    assert data.get_tokenizer(given, "/nonexistent").model_proto == tok.model_proto
    with pytest.raises(ValueError, match="vocab_size"):
        data.get_tokenizer(_cfg(vocab_size=300), str(tmp_path))


# ------------------------------------------------------------------ pipeline


def test_packing_keeps_every_token_in_order(tokenizer):
    source = _docs(23)
    batches = _drain(
        data.make_iterator(source, tokenizer, seq_len=16, batch_size=3, seed=7, num_epochs=1)
    )
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "inputs": ((3, 16), np.int32),
            "targets": ((3, 16), np.int32),
            "loss_mask": ((3, 16), np.float32),
        }
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        n = b["loss_mask"].sum(axis=1).astype(int)
        for row, length in enumerate(n):  # loss_mask is 1 exactly on real targets.
            assert b["loss_mask"][row, :length].all() and not b["loss_mask"][row, length:].any()
            assert not b["inputs"][row, length + 1 :].any()
    rows = _rows(batches)
    for prev, nxt in zip(rows, rows[1:], strict=False):
        assert prev["targets"][-1] == nxt["inputs"][0]
    order = list(grain.MapDataset.source(source).shuffle(seed=7))
    expected = [t for doc in order for t in tokenizer.encode(doc["text"]) + [tokenizer.eos_id]]
    assert _stream(batches) == expected
    assert order != source  # Shuffled.


def test_segments_packing_is_concat_plus_document_ids(tokenizer):
    """``packing="segments"``: the rows of "concat" (same inputs, targets, loss mask)
    plus segment ids that start a document at each input EOS (the EOS of the document
    before; it then acts as BOS) and at every row start; padding is segment 0. Each
    segment's inputs are one document's tokens (or its piece in this row), EOS first."""
    source = _docs(9, words=1)
    kwargs = dict(seq_len=32, batch_size=2, seed=5, num_epochs=1)
    concat = _drain(data.make_iterator(source, tokenizer, **kwargs))
    packed = _drain(data.make_iterator(source, tokenizer, packing="segments", **kwargs))
    assert len(concat) == len(packed)
    docs = {tuple(tokenizer.encode(d["text"]) + [tokenizer.eos_id]) for d in source}
    eos = tokenizer.eos_id
    whole = 0
    for c, p in zip(concat, packed, strict=True):
        assert set(p) == {*c, "segment_ids"} and p["segment_ids"].dtype == np.int32
        for key in c:
            np.testing.assert_array_equal(c[key], p[key])
        for row in range(len(p["inputs"])):
            ids, inputs, mask = p["segment_ids"][row], p["inputs"][row], p["loss_mask"][row]
            n = min(int(mask.sum()) + 1, len(mask)) if mask.any() else 0  # real inputs
            assert not ids[n:].any() and (n == 0 or ids[0] == 1)
            assert (np.diff(ids[:n]) >= 0).all() and (np.diff(ids[:n]) <= 1).all()
            starts = np.flatnonzero(np.diff(ids[:n]) == 1) + 1
            assert (inputs[starts] == eos).all()  # every later segment starts at an EOS
            assert not (inputs[1:n] == eos)[np.setdiff1d(np.arange(n - 1), starts - 1)].any()
            for seg in np.unique(ids[:n])[1:-1]:  # inner segments: a whole document
                at = np.flatnonzero(ids == seg)
                tokens = tuple(inputs[at[1:]]) + (int(p["targets"][row][at[-1]]),)
                assert tokens in docs
                whole += 1
    assert whole > 0


def test_segments_iterator_state_resumes_exactly(tokenizer):
    source = _docs(6)

    def make():
        return data.make_iterator(
            source, tokenizer, seq_len=12, batch_size=2, seed=3, packing="segments"
        )

    it = make()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 9)
    restored = make()
    restored.set_state(state)
    _assert_same(_take(restored, 9), expected)
    assert all("segment_ids" in b for b in expected)


def _doc_order(stream: list[int], tokenizer: data.Tokenizer, source: list[dict]) -> list[int]:
    """Indices into ``source`` of the documents in ``stream``, which must be whole."""
    ids = [tokenizer.encode(d["text"]) + [tokenizer.eos_id] for d in source]
    order, start = [], 0
    for end, token in enumerate(stream, 1):
        if token == tokenizer.eos_id:
            order.append(ids.index(stream[start:end]))
            start = end
    assert start == len(stream)
    return order


def test_epochs_are_shuffled_differently(tokenizer):
    source = _docs(8, words=3)
    it = data.make_iterator(source, tokenizer, seq_len=8, batch_size=1, seed=0, num_epochs=2)
    order = _doc_order(_stream(_drain(it)), tokenizer, source)
    assert sorted(order[:8]) == sorted(order[8:]) == list(range(8))
    assert order[:8] != order[8:]


def test_process_shards_are_disjoint_and_cover_the_source(tokenizer):
    source = _docs(11)
    shards = []
    for index in (0, 1):
        it = data.make_iterator(
            source, tokenizer, seq_len=32, batch_size=2, seed=1,
            shard_index=index, shard_count=2, num_epochs=1,
        )  # fmt: skip
        shards.append(_doc_order(_stream(_drain(it)), tokenizer, source))
    assert sorted(shards[0]) == list(range(0, 11, 2))
    assert sorted(shards[1]) == list(range(1, 11, 2))


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("skip", [0, 1, 5, 13])
def test_iterator_state_resumes_exactly(tokenizer, skip):
    source = _docs(6)

    def make():
        return data.make_iterator(source, tokenizer, seq_len=12, batch_size=2, seed=3)

    it = make()
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 9)  # Crosses document and epoch boundaries.
    restored = make()
    _take(restored, 2)  # Restoring must not depend on where the iterator was.
    restored.set_state(state)
    _assert_same(_take(restored, 9), expected)


def test_orbax_checkpoint_manager_restores_iterator(tmp_path, tokenizer):
    source = _docs(6)

    def make():
        return data.make_iterator(source, tokenizer, seq_len=12, batch_size=2, seed=4)

    it = make()
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=data.checkpoint_args(it)))
        mngr.wait_until_finished()
    expected = _take(it, 5)
    restored = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(data=data.checkpoint_args(restored, restore=True)),
        )
    _assert_same(_take(restored, 5), expected)


def test_end_to_end_embedded_batches_decode_to_english(tmp_path):
    cfg = _cfg(vocab_size=512, tokenizer_train_docs=40)
    tok = data.get_tokenizer(cfg, str(tmp_path))
    it = data.make_iterator(
        data.open_source(cfg, cfg.eval_split), tok, seq_len=64, batch_size=4, seed=0, num_epochs=1
    )
    batches = _drain(it)
    text = tok.decode(_stream(batches))
    assert " the " in text
    assert batches[-1]["inputs"].shape == (4, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=1), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
        (dict(shard_index=3, shard_count=5, source=_docs(2)), "empty"),
        (dict(source=[]), "empty"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(packing="documents"), "packing must be one of concat, segments"),
    ],
)
def test_make_iterator_rejects_bad_arguments(tokenizer, kwargs, match):
    args = dict(source=_docs(3), seq_len=8, batch_size=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        data.make_iterator(args.pop("source"), tokenizer, **args)
