"""Run configuration: the defaults every config file starts from, and conversions.

Config files under ``configs/`` call :func:`default_config` and override fields; every
field can also be overridden on the command line (``--config.model.layout=yoco``).
"""

from __future__ import annotations

import argparse
import dataclasses

import ml_collections

from kvshare_jax.layout import from_spec
from kvshare_jax.model import ModelConfig

YOCO_DEFAULT_WINDOW = 4096


# ModelConfig fields the model section does not hold as such: the layout is a spec string
# there (with num_layers), the vocabulary is the tokenizer's (data.vocab_size)
_NOT_MODEL_FIELDS = ("layout", "vocab_size")


def model_fields() -> dict[str, object]:
    """``{name: default}`` of the :class:`ModelConfig` fields a model section holds."""
    return {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.name not in _NOT_MODEL_FIELDS
    }


def model_section() -> ml_collections.ConfigDict:
    """``config.model``: ``num_layers`` and ``layout`` (a spec: preset name like
    ``'sandwich-middle:4'``, ``'cla:2'``, ``'yoco'``, or a mapping like ``'0_6_6_7'``)
    plus every other :class:`ModelConfig` field with its default, so a new model field
    is added in one place. ``sliding_window`` 0 with 's' layers (yoco) means 4096."""
    m = ml_collections.ConfigDict()
    m.num_layers = 8  # L: transformer layers
    m.layout = "standard"  # layout spec (see above)
    for name, default in model_fields().items():
        m[name] = default
    return m


def default_config() -> ml_collections.ConfigDict:
    """The flat default run config (one comment per field)."""
    config = ml_collections.ConfigDict()

    config.model = model_section()  # ModelConfig's fields (model.py documents each)

    config.data = d = ml_collections.ConfigDict()
    d.dataset = "embedded"  # 'embedded' | 'text:<folder or glob>' | TFDS name ('lm1b')
    d.tfds_data_dir = ""  # where prepared TFDS data lives ('' = ~/tensorflow_datasets)
    d.text_key = "text"  # feature holding the text
    d.train_split = "train"  # TFDS split for training
    d.eval_split = "validation"  # TFDS split for evaluation
    d.tokenizer_path = ""  # '' = train-or-load <workdir>/tokenizer.model
    d.vocab_size = 4096  # sentencepiece vocabulary (= model vocabulary)
    d.tokenizer_train_docs = 20000  # documents sampled to train the tokenizer

    config.train = t = ml_collections.ConfigDict()
    t.seq_len = 256  # tokens per training sequence
    t.batch_size = 16  # global batch (sequences per step, all processes)
    t.num_steps = 2000  # optimizer steps
    t.learning_rate = 1e-3  # peak learning rate
    t.warmup_steps = 100  # linear warm-up steps
    t.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
    t.weight_decay = 0.1  # AdamW weight decay
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.grad_clip = 1.0  # global-norm gradient clipping (0 = off)
    t.grad_accum = 1  # micro-batches accumulated per step
    t.seed = 0  # seed for init and data order
    t.init_from = ""  # workdir or HF dir whose weights start the run (the model is its)
    t.log_every = 10  # steps between metric logs
    t.eval_every = 200  # steps between eval runs (0 = only at the end)
    t.eval_steps = 10  # batches per eval
    t.checkpoint_every = 200  # steps between checkpoints
    t.max_to_keep = 3  # checkpoints kept

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
    mesh.fsdp = 1  # parameter-sharding axis size
    mesh.tensor = 1  # tensor-parallel axis size (heads, mlp)
    # logical axis -> mesh axes
    mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
    )
    config.lock()
    return config


def model_config_from(
    config: ml_collections.ConfigDict, vocab_size: int | None = None
) -> ModelConfig:
    """Builds the frozen :class:`ModelConfig` from a run config's ``model`` section.

    ``vocab_size`` defaults to ``config.data.vocab_size`` (the tokenizer's vocabulary).
    """
    m = config.model
    layout = from_spec(str(m.layout), int(m.num_layers))
    fields = {name: type(default)(m[name]) for name, default in model_fields().items()}
    if any(layout.sliding) and fields["sliding_window"] < 1:
        fields["sliding_window"] = YOCO_DEFAULT_WINDOW
    vocab = int(vocab_size or config.data.vocab_size)
    return ModelConfig(layout=layout, vocab_size=vocab, **fields)


def load_config(path: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads a config file's ``get_config()`` and applies ``key=value`` overrides.

    Used where absl flags are not (tests, the study runner); values are parsed like
    command-line overrides (``"model.layout=yoco"``, ``"train.num_steps=10"``).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kvshare_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like 'section.field=value'")
        apply_override(config, key.removeprefix("config."), value)
    return config


def apply_override(config: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Sets ``config.<key>`` from a string, converted to the field's existing type."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"unknown config field {key!r}")
    old = node[leaf]
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} expects a boolean, got {value!r}")
        node[leaf] = value.lower() in ("true", "1")
    elif isinstance(old, (int, float, str)):
        node[leaf] = type(old)(value)
    else:
        import ast

        node[leaf] = ast.literal_eval(value)


def parse_with_overrides(
    argv: list[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """Flags plus ``--config.a.b=value`` overrides (returned as ``"config.a.b=value"``
    without the dashes); raises ``ValueError`` on other unknown flags."""
    args, rest = parser.parse_known_args(argv)
    overrides = tuple(a.removeprefix("--") for a in rest if a.startswith("--config."))
    if len(overrides) != len(rest):
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    return args, overrides
