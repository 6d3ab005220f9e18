"""Data pipeline: text sources -> SentencePiece -> packed int32 batches (grain, no TF).

Typical use (``cfg`` is the ``data`` block of a run config, see
``kvshare_jax.config.default_config``)::

  tokenizer = data.get_tokenizer(cfg, workdir)
  source = data.open_source(cfg, cfg.train_split)
  it = data.make_iterator(source, tokenizer, seq_len=128, batch_size=8, seed=0,
                          shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)  # {"inputs", "targets", "loss_mask"}: [8, 128]

TensorFlow Datasets is imported only when a ``text:`` or TFDS dataset is opened, or one
of the names of ``tfds_text`` (``LocalText``, ``prepare_local_text``, ``prepared_source``)
is first read from this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvshare_jax.data.corpus import EmbeddedSource, embedded_documents
from kvshare_jax.data.pipeline import checkpoint_args, make_iterator
from kvshare_jax.data.sources import open_source
from kvshare_jax.data.text_source import TextSource
from kvshare_jax.data.tokenizer import Tokenizer, get_tokenizer, train_or_load_tokenizer

if TYPE_CHECKING:
    from kvshare_jax.data.tfds_text import LocalText, prepare_local_text, prepared_source

_TFDS_NAMES = ("LocalText", "prepare_local_text", "prepared_source")

__all__ = [
    "EmbeddedSource",
    "LocalText",
    "TextSource",
    "Tokenizer",
    "checkpoint_args",
    "embedded_documents",
    "get_tokenizer",
    "make_iterator",
    "open_source",
    "prepare_local_text",
    "prepared_source",
    "train_or_load_tokenizer",
]


def __getattr__(name: str) -> Any:
    """The TFDS names, imported on first use (PEP 562)."""
    if name in _TFDS_NAMES or name == "tfds_text":
        module = importlib.import_module("kvshare_jax.data.tfds_text")
        return module if name == "tfds_text" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
