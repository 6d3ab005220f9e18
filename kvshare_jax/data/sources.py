"""``open_source``: the random-access ``{"text": str}`` source named by a data config."""

from __future__ import annotations

import re

import ml_collections

from kvshare_jax.data.corpus import EmbeddedSource
from kvshare_jax.data.text_source import TextSource

# "name", "name/config", "name:1.2.3", optionally with the "huggingface:" namespace.
_TFDS_NAME = re.compile(r"(huggingface:)?[\w.\-]+(/[\w.\-]+)?(:[\d.*]+)?")


def open_source(cfg: ml_collections.ConfigDict, split: str) -> EmbeddedSource | TextSource:
    """Opens ``split`` of the dataset ``cfg.dataset`` (see ``kvshare_jax.config.default_config``).

    Raises ``ValueError`` for an unknown dataset spec or split, and
    ``FileNotFoundError`` when a named TFDS dataset is not prepared.
    """
    spec = cfg.dataset
    if spec == "embedded":
        return EmbeddedSource(split)
    if spec.startswith("text:"):
        from kvshare_jax.data.tfds_text import local_text_source  # TFDS, imported on use

        return local_text_source(spec.removeprefix("text:"), split, cfg.tfds_data_dir)
    if _TFDS_NAME.fullmatch(spec):
        from kvshare_jax.data.tfds_text import prepared_source

        return prepared_source(spec, split, cfg.tfds_data_dir, cfg.text_key)
    raise ValueError(
        f"unknown dataset spec {spec!r}: expected 'embedded', 'text:<folder or glob>' "
        "or a prepared TFDS name such as 'lm1b', 'c4/en:3.1.0' or "
        "'huggingface:<name>/<config>'"
    )
