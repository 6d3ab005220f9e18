"""Run configuration: the defaults every config file starts from, and conversions.

Config files under ``configs/`` call :func:`default_config` and override fields; every
field can also be overridden on the command line (``--config.model.layout=yoco``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any

import ml_collections
from etils import epath

from kvshare_jax.layout import from_spec
from kvshare_jax.model import ModelConfig
from kvshare_jax.paths import require_filesystem

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
    # 'concat': rows cut from the document stream, attention across documents (HF
    # run_clm, the paper's code: the default, so paper configs stay comparable);
    # 'segments': the same rows with segment ids, attention and RoPE positions per document
    d.packing = "concat"

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
    t.profile_steps = ()  # (a, b): a jax.profiler trace of steps a..b in <workdir>/profile
    t.wandb_project = ""  # log scalars and config to this Weights & Biases project ([wandb])

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
    """Loads a run config and applies ``key=value`` overrides.

    ``path`` is a config file whose ``get_config()`` returns the config, or a run's saved
    ``config.json`` (``kvshare train --config WORKDIR/config.json`` reproduces the run).
    Overrides are parsed like command-line ones (``"model.layout=yoco"``). Every problem
    (missing file, syntax error, a raising ``get_config``, unknown field, bad value) is a
    one-line ``ValueError``/``FileNotFoundError``.
    """
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    config = _load_json(path) if path.endswith(".json") else _load_py(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like 'section.field=value'")
        apply_override(config, key.removeprefix("config."), value)
    return config


def _load_py(path: str) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kvshare_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path} is not a Python file (or a config.json)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - a config file may raise anything
        raise ValueError(f"config file {path} raised {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config()")
    try:
        config = module.get_config()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"config file {path}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config file {path}: get_config() returned {type(config).__name__}")
    return config


def _load_json(path: str) -> ml_collections.ConfigDict:
    """A saved ``config.json`` laid over the defaults (field types kept, lists of tuple
    fields back to tuples); unknown fields of the default sections are errors."""
    try:
        saved = json.loads(epath.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(saved, dict):
        raise ValueError(f"config file {path} holds no JSON object")
    config = default_config()
    config.unlock()
    for section, fields in saved.items():
        if section not in config:  # a section a config file added (e.g. study)
            config[section] = ml_collections.ConfigDict(_tuples(fields))
            continue
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: section {section!r} is not an object")
        for name, value in fields.items():
            key = f"{section}.{name}"
            if name not in config[section]:
                raise ValueError(f"{path}: unknown config field {key!r}")
            config[section][name] = _typed(key, config[section][name], _tuples(value))
    config.lock()
    return config


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _typed(key: str, old: Any, value: Any) -> Any:
    """``value`` as the type of the field's current value ``old``."""
    if isinstance(old, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(old, bool):
            raise ValueError(f"{key} expects {type(old).__name__}, got {value!r}")
        return value
    if isinstance(old, float) and isinstance(value, (int, float)):
        return float(value)
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f"{key} expects {type(old).__name__}, got {value!r}")
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Sets ``config.<key>`` from a string, converted to the field's existing type."""
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            _unknown(".".join(parents[: i + 1]), node)
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        _unknown(key, node)
    old = node[leaf]
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} expects a boolean (true/false), got {value!r}")
        new: Any = value.lower() in ("true", "1")
    elif isinstance(old, (int, float)):
        try:
            new = type(old)(value)
        except ValueError:
            what = "an integer" if isinstance(old, int) else "a number"
            raise ValueError(f"{key} expects {what}, got {value!r}") from None
    elif isinstance(old, str):
        new = value
    else:
        import ast

        try:
            new = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{key} expects a literal like {old!r}, got {value!r}") from None
        new = _typed(key, old, new)
    try:
        node[leaf] = new
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def _unknown(key: str, node: Any) -> None:
    """Raises the one-line error for an unknown field, with the closest known names."""
    known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    parent, _, leaf = key.rpartition(".")
    close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(leaf, known, n=2)]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ValueError(f"unknown config field {key!r}{hint}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ``ValueError`` naming the field for a config that cannot run; checks
    everything that needs no devices, data or workdir (``train.validate`` adds the mesh)."""
    model_config_from(config)  # the layout and every model field (ModelConfig checks them)
    t, d, m = config.train, config.data, config.mesh
    positive = ("seq_len", "batch_size", "num_steps", "log_every", "checkpoint_every",
                "eval_steps", "grad_accum", "max_to_keep")  # fmt: skip
    for name in positive:
        _check(t, f"train.{name}", t[name] >= 1, ">= 1")
    for name in ("warmup_steps", "eval_every", "seed"):
        _check(t, f"train.{name}", t[name] >= 0, ">= 0")
    _check(t, "train.learning_rate", 0 <= t.learning_rate < math.inf, ">= 0 and finite")
    steps = tuple(t.profile_steps)
    ok = not steps or (len(steps) == 2 and all(isinstance(s, int) for s in steps))
    _check(t, "train.profile_steps", ok and (not steps or 1 <= steps[0] <= steps[1]),
           "() or (a, b) with 1 <= a <= b")  # fmt: skip
    _check(t, "train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]")
    _check(t, "train.weight_decay", 0 <= t.weight_decay < math.inf, ">= 0")
    _check(t, "train.grad_clip", 0 <= t.grad_clip < math.inf, ">= 0 (0 = off)")
    for name in ("b1", "b2"):
        _check(t, f"train.{name}", 0 <= t[name] < 1, "in [0, 1)")
    if t.seq_len > config.model.max_len:
        raise ValueError(
            f"train.seq_len ({t.seq_len}) exceeds model.max_len ({config.model.max_len})"
        )
    if t.batch_size % t.grad_accum:
        raise ValueError(
            f"train.batch_size ({t.batch_size}) is not divisible by train.grad_accum "
            f"({t.grad_accum})"
        )
    _check(d, "data.vocab_size", d.vocab_size >= 1, ">= 1")
    _check(d, "data.packing", d.packing in ("concat", "segments"), "'concat' or 'segments'")
    _check(d, "data.tokenizer_train_docs", d.tokenizer_train_docs >= 1, ">= 1")
    for name in ("dataset", "train_split", "eval_split", "text_key"):
        _check(d, f"data.{name}", bool(d[name].strip()), "non-empty")
    if d.tokenizer_path and not epath.Path(d.tokenizer_path).exists():
        raise ValueError(
            f"data.tokenizer_path {d.tokenizer_path} does not exist (leave it empty to train "
            "a tokenizer into the workdir)"
        )
    sizes = {name: m[name] for name in ("data", "fsdp", "tensor")}
    if list(sizes.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        described = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh sizes must be >= 1 with at most one -1 (fill), got {described}")


def _check(section: ml_collections.ConfigDict, key: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {section[key.split('.')[-1]]!r}")


def diff_from_defaults(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (default, value)}`` of the fields that differ from
    :func:`default_config` (fields of sections the defaults lack are left out)."""
    return diff(default_config(), config)


def diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> dict[str, tuple]:
    """``{"section.field": (a's value, b's value)}`` where ``a`` and ``b`` differ, over the
    fields both have (JSON values compared, so a tuple equals its saved list)."""
    fa, fb = _flat(json.loads(a.to_json())), _flat(json.loads(b.to_json()))
    return {k: (fa[k], fb[k]) for k in sorted(fa.keys() & fb.keys()) if fa[k] != fb[k]}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_output_dir(path: str, what: str) -> None:
    """``ValueError`` naming ``what`` (e.g. ``"workdir"``) for an output directory that is
    a file, lies under a file or cannot be created or written; writes nothing."""
    require_filesystem(path)
    target = epath.Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {path} is a file")
    if "://" in path:
        return  # object stores: permissions show at the first write
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path} is under a file ({existing})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable ({existing} is read-only)")
