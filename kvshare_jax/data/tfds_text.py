"""TFDS sources without TensorFlow: local text files and prepared named datasets.

Both are array_record datasets read with ``as_data_source()`` (random access, no
``tf.data``), wrapped in ``TextSource`` so every source yields ``{"text": str}``.

``LocalText`` turns local UTF-8 text files into a TFDS dataset with one document per
file (the text is kept byte for byte). The files are split into ``train`` and
``validation`` by a stable hash of their relative paths (``corpus.split_by_hash``);
at least two files are needed so that neither split is empty. Split one large file
into several if needed.

Only ``open_source`` (for a ``text:`` or TFDS dataset spec) and the lazy names of
``kvshare_jax.data`` import this module: TensorFlow Datasets takes a while to import.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder
from tensorflow_datasets.core.utils import conversion_utils

from kvshare_jax.data.corpus import split_by_hash
from kvshare_jax.data.text_source import TextSource

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


def resolve_data_dir(data_dir: str | None) -> str:
    """The TFDS data dir actually used: ``data_dir`` or TFDS's default."""
    return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def list_text_files(pattern: str) -> list[str]:
    """Sorted absolute paths of the files under a folder (recursively) or matching a glob."""
    path = os.path.abspath(os.path.expanduser(pattern))
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    else:
        found = glob.glob(path, recursive=True)
    return sorted(f for f in found if os.path.isfile(f))


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files as a TFDS dataset: one ``{"text": ...}`` document per file.

    The config name fingerprints the pattern and the files' paths, sizes and mtimes,
    so editing the files prepares a fresh copy instead of reading stale data.
    """

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No checksums or metadata files belong to this builder.

        TFDS's default looks up the defining package with ``importlib_resources``,
        which is not installed.
        """
        return None

    def __init__(self, *, pattern: str, data_dir: str | None = None):
        if not pattern:
            raise ValueError("empty text dataset pattern; expected 'text:<folder or glob>'")
        files = list_text_files(pattern)
        if len(files) < 2:
            raise ValueError(
                f"text dataset {pattern!r} matches {len(files)} file(s); at least 2 are "
                "needed (one document per file, split into train and validation)"
            )
        self._root = os.path.commonpath([os.path.dirname(f) for f in files])
        self._files = files
        fingerprint = hashlib.sha256(repr(os.path.abspath(pattern)).encode())
        for f in files:
            stat = os.stat(f)
            fingerprint.update(repr((self._relpath(f), stat.st_size, stat.st_mtime_ns)).encode())
        config = tfds.core.BuilderConfig(
            name=f"files_{fingerprint.hexdigest()[:16]}",
            description=f"text files {pattern}",
        )
        super().__init__(config=config, data_dir=data_dir)

    def _relpath(self, path: str) -> str:
        return os.path.relpath(path, self._root)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local UTF-8 text files, one document per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download.
        by_path = {self._relpath(f): f for f in self._files}
        return {
            split: self._generate_examples([by_path[p] for p in paths])
            for split, paths in split_by_hash(list(by_path)).items()
        }

    def _generate_examples(self, files: list[str]):
        for path in files:
            try:
                with open(path, encoding="utf-8", newline="") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text: {e}") from e
            yield self._relpath(path), {"text": text}


def prepare_local_text(pattern: str, data_dir: str | None = None) -> LocalText:
    """Returns the ``LocalText`` builder for ``pattern``, preparing it (once) if needed."""
    data_dir = resolve_data_dir(data_dir)
    builder = LocalText(pattern=pattern, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(file_format=ARRAY_RECORD)
        except (FileExistsError, ValueError):
            # Another process finished preparing the same files first: use its copy.
            builder = LocalText(pattern=pattern, data_dir=data_dir)
            if not builder.is_prepared():
                raise
    return builder


def _split_records(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[Any]:
    """The array_record data source of ``split``, with the dataset named in errors."""
    try:
        return builder.as_data_source(split=split, file_format=ARRAY_RECORD)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"cannot read split {split!r} of {builder.data_dir} (splits: "
            f"{sorted(builder.info.splits)}): {e}"
        ) from e


def local_text_source(pattern: str, split: str, data_dir: str | None = None) -> TextSource:
    """Random-access ``{"text": str}`` source of a split of local text files."""
    return TextSource(_split_records(prepare_local_text(pattern, data_dir), split))


def _on_disk_name(name: str) -> str:
    """Name under which ``tfds build`` stores ``name``; ``huggingface:`` names are sanitised."""
    if not name.startswith("huggingface:"):
        return name
    name, colon, version = name.removeprefix("huggingface:").partition(":")
    parts = "/".join(conversion_utils.to_tfds_name(p) for p in name.split("/", 1))
    return parts + colon + version


def prepared_source(
    name: str, split: str, data_dir: str | None = None, text_key: str = "text"
) -> TextSource:
    """Opens a named TFDS dataset already prepared as array_record under ``data_dir``.

    Reads the prepared files only (no builder code, download or TensorFlow), so it
    raises ``FileNotFoundError`` when the dataset has not been prepared there.
    """
    data_dir = resolve_data_dir(data_dir)
    how = (
        f"prepare it once in array_record format, e.g. `tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record` (on a machine with its "
        "download dependencies), or set the data config's tfds_data_dir"
    )
    try:
        builder = read_only_builder.builder_from_files(_on_disk_name(name), data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {data_dir}: {how}"
        ) from e
    formats = builder.info.available_file_formats()
    if ARRAY_RECORD not in formats:
        found = sorted(f.value for f in formats)
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {found}, "
            f"which needs TensorFlow to read; {how}"
        )
    if text_key not in builder.info.features:
        raise ValueError(
            f"TFDS dataset {name!r} has no feature {text_key!r} (text_key); "
            f"its features are {sorted(builder.info.features)}"
        )
    return TextSource(_split_records(builder, split), text_key)
