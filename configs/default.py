"""Default run config: an 8-layer, d=512 model on the embedded corpus.

All fields and their meaning: ``kvshare_jax/config.py::default_config``. Override any
field on the command line, e.g. ``--config.model.layout=lasagna-bottom:4``.

Target slice: v5e:1x1 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config


def get_config():
    return default_config()
