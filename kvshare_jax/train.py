"""Training: sharded init, the AdamW train step, evaluation and the resumable loop.

Shapes: b global batch, a micro-batches (``train.grad_accum``), T sequence length,
v vocabulary. One call of the train step is one optimizer update; with gradient
accumulation it scans over ``a`` micro-batches of ``b / a`` rows.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvshare_jax import checkpoint, flops, preemption, progress, sharding
from kvshare_jax.config import (
    check_output_dir,
    diff,
    diff_from_defaults,
    load_config,
    model_config_from,
    validate_config,
)
from kvshare_jax.data import get_tokenizer, make_iterator, open_source
from kvshare_jax.data.tokenizer import TOKENIZER_EXTRAS, TOKENIZER_FILES
from kvshare_jax.metrics import MetricWriter, latest_metrics
from kvshare_jax.model import ModelConfig, Params, forward, init_params

# inputs, targets: int32 [b, T]; loss_mask: float32 [b, T]; with data.packing="segments"
# also segment_ids: int32 [b, T] (the documents of each row, 0 on padding)
Batch = dict[str, jax.Array]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stops without saving."""


class TrainState(NamedTuple):
    """What one update reads and writes; the step count lives in the loop/checkpoint."""

    params: Params
    opt_state: optax.OptState


# --------------------------------------------------------------- optimizer
def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, cosine decay to ``learning_rate * min_lr_ratio``."""
    peak = float(train.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=int(train.warmup_steps),
        decay_steps=max(int(train.num_steps), int(train.warmup_steps) + 1),
        end_value=peak * float(train.min_lr_ratio),
    )


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (no weight decay on 1-D params: norm scales) after global-norm clipping."""
    adamw = optax.adamw(
        make_schedule(train),
        b1=float(train.b1),
        b2=float(train.b2),
        weight_decay=float(train.weight_decay),
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if float(train.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(train.grad_clip)), adamw)
    return adamw


# ----------------------------------------------------------------- steps
def loss_terms(cfg: ModelConfig, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token cross-entropies, number of loss tokens)`` of a batch; with
    ``segment_ids`` each document attends only to itself, positions from 0."""
    logits = forward(cfg, params, batch["inputs"], segment_ids=batch.get("segment_ids"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(ce * mask), jnp.sum(mask)


def train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    grad_accum: int,
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on the masked mean cross-entropy of ``batch``; returns loss, grad norm
    and the number of loss tokens (padding excluded: the tokens/s of the log).

    The batch ``[b, T]`` is split into ``a`` strided micro-batches ``[a, b/a, T]`` (each
    device keeps its rows) and the summed gradients are scanned, so memory holds one
    micro-batch of activations.
    """

    def split(x: jax.Array) -> jax.Array:  # [b, T] -> [a, b/a, T]
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, *sharding.BATCH_AXES))

    def accumulate(carry, micro: Batch):
        loss_sum, weight, grads = carry
        (l_sum, w), g = jax.value_and_grad(functools.partial(loss_terms, cfg), has_aux=True)(
            state.params, micro
        )
        return (loss_sum + l_sum, weight + w, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, init, jax.tree.map(split, batch))
    tokens = weight
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    return TrainState(params, opt_state), metrics


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in ``tree`` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------- state
def state_shardings(
    cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: sharding.Rules
) -> tuple[TrainState, TrainState]:
    """``(abstract state with shardings, state shardings)`` without allocating anything."""
    abstract_params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    params_sharding = sharding.param_shardings(cfg, mesh, rules)
    opt_sharding = sharding.opt_state_shardings(tx, abstract_opt, params_sharding, mesh)
    shardings = TrainState(params_sharding, opt_sharding)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(abstract_params, abstract_opt),
        shardings,
    )
    return abstract, shardings


def init_state(
    cfg: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState, seed: int
) -> TrainState:
    """Initialises params and optimizer state directly in their shardings (no host copy)."""

    def create(rng: jax.Array) -> TrainState:
        params = init_params(cfg, rng)
        return TrainState(params, tx.init(params))

    return jax.jit(create, out_shardings=shardings)(jax.random.key(seed))


def in_mesh(fn: Callable, mesh: Mesh, rules: sharding.Rules) -> Callable:
    """``fn`` called (and so traced) with ``mesh`` and the logical-axis ``rules`` active."""

    @functools.wraps(fn)
    def wrapped(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    return wrapped


def jit_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    grad_accum: int,
    mesh: Mesh,
    rules: sharding.Rules,
    shardings: TrainState,
) -> Any:
    """``train_step`` jitted with sharded inputs/outputs and the state donated; trace it
    (call, ``lower``) under :func:`in_mesh` or ``jax.set_mesh(mesh)`` + the rules."""
    return jax.jit(
        functools.partial(train_step, cfg, tx, grad_accum),
        in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def compile_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    grad_accum: int,
    mesh: Mesh,
    rules: sharding.Rules,
    shardings: TrainState,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step``, traced under the mesh and rules when called."""
    return in_mesh(jit_train_step(cfg, tx, grad_accum, mesh, rules, shardings), mesh, rules)


# ------------------------------------------------------------------ setup
def validate(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules) -> None:
    """Raises ``ValueError`` naming the field for settings that cannot train here."""
    validate_config(config)
    t = config.train
    sharding.check_batch_divisible(t.batch_size, mesh, rules, "train.batch_size")
    if t.grad_accum > 1:
        micro = t.batch_size // t.grad_accum
        sharding.check_batch_divisible(micro, mesh, rules, "micro-batch (batch / grad_accum)")


def _tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """Trains (first process) or loads the tokenizer; other processes wait, then load."""
    if jax.process_count() == 1:
        return get_tokenizer(config.data, workdir)
    if jax.process_index() == 0:
        get_tokenizer(config.data, workdir)
    multihost_utils.sync_global_devices("kvshare_tokenizer")
    return get_tokenizer(config.data, workdir)


# Model fields that the weights of ``train.init_from`` fix; the others (dtype,
# attention_impl, forward/backward passes, remat...) stay the run config's.
INIT_SOURCE_FIELDS = (
    "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "max_len",
    "sliding_window", "rope_theta", "norm_eps", "tie_embeddings",
)  # fmt: skip


def adopt_init_source(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The run config of a run started from ``train.init_from`` (a workdir or HF dir):
    its model section and vocabulary become the source's; the source's ``tokenizer.model``
    (when the config names no tokenizer) is copied into ``workdir``."""
    src = config.train.init_from
    cfg = checkpoint.model_config_of(src)
    config = config.copy_and_resolve_references()
    for name in INIT_SOURCE_FIELDS:
        config.model[name] = getattr(cfg, name)
    config.model.layout = str(cfg.layout)
    config.data.vocab_size = cfg.vocab_size
    files = [*TOKENIZER_FILES, *TOKENIZER_EXTRAS]  # sentencepiece or tokenizer.json + specials
    present = [epath.Path(src) / f for f in files if (epath.Path(src) / f).exists()]
    has_own = any((epath.Path(workdir) / f).exists() for f in TOKENIZER_FILES)
    if not config.data.tokenizer_path and present and not has_own:
        if jax.process_index() == 0:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            for source in present:
                source.copy(epath.Path(workdir) / source.name)
    if config.train.seq_len > cfg.max_len:
        raise ValueError(
            f"train.seq_len={config.train.seq_len} exceeds the context of {src} ({cfg.max_len})"
        )
    return config


def _check_same_params(workdir: str, cfg: ModelConfig) -> None:
    """A resumed run must have the parameter shapes of the model saved in ``workdir``
    (other fields, e.g. ``dtype`` or ``forward_passes``, may change)."""
    try:
        saved = checkpoint.load_model_config(workdir)
    except FileNotFoundError:
        return

    def shapes(c: ModelConfig) -> Any:
        return jax.eval_shape(functools.partial(init_params, c), jax.random.key(0))

    if shapes(saved) != shapes(cfg):
        raise ValueError(
            f"{workdir} holds a model with other parameter shapes (layout {saved.layout}, "
            f"d_model {saved.d_model}, vocab {saved.vocab_size}) than this config (layout "
            f"{cfg.layout}, d_model {cfg.d_model}, vocab {cfg.vocab_size}); use a new --workdir"
        )


# Fields a resumed run may change: how long and how often, how the work is laid out on
# devices (mesh, micro-batches, remat, attention and matvec kernels), where prepared TFDS
# data lives.
# Any other difference (model, data, tokenizer, optimizer, seed) makes it another run.
RESUMABLE_FIELDS = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_steps",
    "train.checkpoint_every", "train.max_to_keep", "train.grad_accum", "train.profile_steps",
    "train.wandb_project",
    "model.attention_impl", "model.matvec_impl", "model.remat", "data.tfds_data_dir",
)  # fmt: skip
RESUMABLE_SECTIONS = ("mesh.",)


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses (``ValueError`` listing the fields) to continue the run saved in
    ``workdir`` with a config that differs in anything but :data:`RESUMABLE_FIELDS`."""
    path = epath.Path(workdir) / checkpoint.RUN_CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = load_config(str(path))
    except ValueError as e:
        raise ValueError(f"cannot resume {workdir}: {e}") from None
    changed = {
        k: v
        for k, v in diff(saved, config).items()
        if k not in RESUMABLE_FIELDS and not k.startswith(RESUMABLE_SECTIONS)
    }
    if "data.packing" in changed:  # what every step computes: its own line
        a, b = changed["data.packing"]
        raise ValueError(
            f"{workdir} was trained with data.packing={a!r}, not {b!r}: a resumed run "
            f"keeps its packing (--config {path}), or use a new --workdir"
        )
    if changed:
        fields = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"{workdir} holds another run: {fields}; resume with the saved config "
            f"(--config {path}) or use a new --workdir"
        )


def check_workdir(workdir: str) -> None:
    """``ValueError`` for a workdir that is a file or that cannot be written."""
    check_output_dir(workdir, "workdir")


class Trainer:
    """What a run needs, built from a config: mesh, model config, optimizer, jitted steps
    (traced under the mesh and logical-axis rules) and data iterators."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, t = config, config.train
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.logical_rules(config.mesh)
        validate(config, self.mesh, self.rules)
        d = config.data
        self.sources = {split: open_source(d, split) for split in (d.train_split, d.eval_split)}
        self.tokenizer = _tokenizer(config, workdir)
        # a run started from other weights keeps their vocabulary (>= the tokenizer's)
        vocab = int(d.vocab_size) if t.init_from else self.tokenizer.vocab_size
        self.cfg = model_config_from(config, vocab_size=vocab)
        self.tx = make_optimizer(t)
        self.schedule = make_schedule(t)
        self.abstract, self.shardings = state_shardings(self.cfg, self.tx, self.mesh, self.rules)
        sharding.check_shardable(self.abstract)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.train_step = compile_train_step(
            self.cfg, self.tx, int(t.grad_accum), self.mesh, self.rules, self.shardings
        )
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.eval_step = in_mesh(
            jax.jit(
                functools.partial(loss_terms, self.cfg),
                in_shardings=(self.shardings.params, self.batch_sharding),
                out_shardings=replicated,
            ),
            self.mesh,
            self.rules,
        )
        self.all_finite = jax.jit(all_finite, out_shardings=replicated)
        self.local_batch = t.batch_size // jax.process_count()

    def describe(self) -> str:
        """Devices, mesh, parameter count and the config fields set away from defaults."""
        devices = jax.devices()
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        count = sum(x.size for x in jax.tree.leaves(self.abstract.params))
        changed = ", ".join(f"{k}={v!r}" for k, (_, v) in diff_from_defaults(self.config).items())
        return (
            f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} "
            f"process(es)); mesh: {mesh}; parameters: {count / 1e6:.2f}M\n"
            f"config (fields not at their defaults): {changed or 'none'}"
        )

    def init_state(self) -> TrainState:
        """Fresh random params, or ``train.init_from``'s weights, and a new optimizer."""
        t = self.config.train
        if not t.init_from:
            return init_state(self.cfg, self.tx, self.shardings, int(t.seed))
        params = checkpoint.open_model(t.init_from, shardings=self.shardings.params).params
        params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, self.abstract.params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        return TrainState(params, opt_state)

    def iterator(self, split: str) -> Any:
        """A fresh grain iterator over this process's shard of ``split``."""
        return make_iterator(
            self.sources[split],
            self.tokenizer,
            seq_len=int(self.config.train.seq_len),
            batch_size=self.local_batch,
            seed=int(self.config.train.seed),
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            packing=str(self.config.data.packing),
        )

    def batches(self, local: Iterator[dict[str, np.ndarray]]) -> Iterator[Batch]:
        """This process's batches ``[b / processes, T]`` as global ``[b, T]`` arrays."""
        for batch in local:
            yield {
                k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in batch.items()
            }

    def evaluate(self, params: Params, num_batches: int | None = None) -> dict[str, float]:
        """Token-weighted mean loss and perplexity over the first ``num_batches``
        (default ``train.eval_steps``) batches of the eval split, packed as the run's
        ``data.packing``."""
        num_batches = num_batches or int(self.config.train.eval_steps)
        batches = self.batches(self.iterator(self.config.data.eval_split))
        loss_sum, weight = 0.0, 0.0
        for _ in range(num_batches):
            l_sum, w = jax.device_get(self.eval_step(params, next(batches)))
            loss_sum, weight = loss_sum + float(l_sum), weight + float(w)
        loss = loss_sum / max(weight, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


# ------------------------------------------------------------------- loop
def _say(message: str) -> None:
    """User-facing progress line (first process only)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def _check_finite(records: dict[int, dict[str, float]], last_saved: int | None) -> None:
    """Raises ``NonFiniteLossError`` at the first step with a NaN/inf metric."""
    for step, m in records.items():
        bad = ", ".join(f"{k}={m[k]}" for k in ("loss", "grad_norm") if not math.isfinite(m[k]))
        if bad:
            kept = f"step {last_saved}" if last_saved is not None else "none saved yet"
            raise NonFiniteLossError(
                f"non-finite {bad} at step {step}; stopped without saving (last good "
                f"checkpoint: {kept}). Lower train.learning_rate or check the data."
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint) and returns the final
    metrics: ``step``, ``loss``, ``grad_norm``, ``lr``, ``tokens_per_sec``, ``eval_loss``,
    ``eval_ppl`` (those of the latest log/eval when the run had already finished).

    The workdir is locked throughout (:mod:`kvshare_jax.workdir_lock`): a second trainer
    of it raises ``WorkdirInUseError``. A failing save raises ``CheckpointSaveError``."""
    from kvshare_jax import workdir_lock

    check_workdir(workdir)
    with workdir_lock.hold(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """:func:`train_and_evaluate` once the workdir is locked."""
    from kvshare_jax.metrics import trim_metrics

    validate_config(config)
    if config.train.init_from:
        config = adopt_init_source(config, workdir)
    check_resume(workdir, config)  # before a tokenizer is trained or a file is written
    trainer = Trainer(config, workdir)
    _say(trainer.describe())
    t = config.train
    _check_same_params(workdir, trainer.cfg)
    ckpt = checkpoint.Checkpointer(workdir, int(t.max_to_keep))
    train_iter = trainer.iterator(config.data.train_split)
    restored = ckpt.restore(trainer.abstract.params, trainer.abstract.opt_state, train_iter)
    if restored is None:
        start, last_saved, state = 0, None, trainer.init_state()
    else:
        start, params, opt_state = restored
        last_saved, state = start, TrainState(params, opt_state)
    checkpoint.save_configs(workdir, config, trainer.cfg)  # only once all checks passed
    if jax.process_index() == 0:  # metrics.jsonl holds no step twice: drop lost progress
        dropped = trim_metrics(workdir, start)
        records = f"the {dropped} records after step {start} from metrics.jsonl"
        if dropped and restored is None:
            _say(f"{workdir} has no checkpoint: training from step 0 (dropped {records})")
        elif dropped:
            _say(f"dropped {records}")
    if start >= t.num_steps:
        ckpt.close()
        _say(f"{workdir} is already trained to step {start} (train.num_steps={t.num_steps})")
        return latest_metrics(workdir)
    if start:
        _say(f"resuming {workdir} from step {start}")

    primary = jax.process_index() == 0
    writer = MetricWriter(workdir, enabled=primary, wandb_project=t.wandb_project)
    writer.write_config(config)
    bar = progress.bar(total=t.num_steps, initial=start, desc="train", unit="step",
                       every=t.log_every, disable=not primary)  # fmt: skip
    batches = trainer.batches(train_iter)
    summary: dict[str, float] = {}
    # the steps since the last flush; after a preemption, those the saved run had run
    pending: dict[int, Any] = preemption.load_pending(workdir, start) if start else {}
    speed = StepSpeed(trainer.cfg, t.batch_size, t.seq_len)
    profile = Profile(workdir, t.profile_steps)
    try:
        with preemption.Guard() as guard:
            for step in range(start + 1, t.num_steps + 1):
                profile.before(step)
                state, pending[step] = trainer.train_step(state, next(batches))
                profile.after(step, pending[step])
                speed.started(step, pending[step])
                final = step == t.num_steps
                preempted = guard.reached(step) and not final
                log = step % t.log_every == 0 or final
                do_eval = (t.eval_every > 0 and step % t.eval_every == 0) or final
                save = step % t.checkpoint_every == 0 or final or preempted
                if not (log or do_eval or save):
                    bar.update(1)
                    continue
                records = jax.device_get(pending)  # waits for the steps so far
                _check_finite(records, last_saved)
                summary["step"] = step
                if log:
                    row = {
                        "loss": float(np.mean([r["loss"] for r in records.values()])),
                        "grad_norm": float(records[step]["grad_norm"]),
                        "lr": float(trainer.schedule(step - 1)),  # the rate used by this step
                        **speed.since_flush(step, records),
                    }
                    writer.write(step, row)
                    summary.update(row)
                    bar.set_postfix(speed.postfix(row))
                bar.update(1)
                if do_eval:
                    row = trainer.evaluate(state.params)
                    writer.write(step, row)
                    summary.update(row)
                    loss, ppl = row["eval_loss"], row["eval_ppl"]
                    _say(f"step {step}: eval_loss {loss:.4f}, ppl {ppl:.2f}")
                if save:
                    if not bool(trainer.all_finite(state.params)):
                        raise NonFiniteLossError(
                            f"non-finite parameters after step {step}; stopped without saving "
                            f"(last good checkpoint: step {last_saved})"
                        )
                    ckpt.save(step, state.params, state.opt_state, train_iter)
                    last_saved = step
                if preempted:
                    ckpt.close()  # waits for the save
                    if primary and not log:  # the unlogged steps, for the resumed run
                        preemption.save_pending(workdir, step, records)
                    raise preemption.PreemptedError(step)
                pending = {}
                speed.flushed(step)
    finally:
        profile.close()
        bar.close()
        writer.close()
        ckpt.close()
    return summary


class StepSpeed:
    """Step time, tokens/s, executed TFLOP/s per device and MFU over the steps since the
    last flush, timed from the end of the first step (compilation excluded). Tokens are
    the steps' loss tokens (the train step's ``tokens``: padding is not counted), else
    ``batch_size * seq_len`` per step. Executed FLOPs: `flops.executed_train_flops`
    (cyclic blocks m + b times, for the whole padded batch, which the step computes);
    MFU: model FLOPs (`flops.model_train_flops`) over the devices' peak, left out where no
    peak is known (CPUs)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, seq_len: int):
        self.tokens = batch_size * seq_len
        self.devices = jax.device_count()
        self.executed = flops.executed_train_flops(cfg, batch_size, seq_len)
        self.model = flops.model_train_flops(cfg, batch_size, seq_len)
        self.peak = flops.peak_flops(jax.devices()[0])
        self.clock, self.since = time.perf_counter(), None

    def started(self, step: int, out: Any) -> None:
        """After each step is dispatched: the first one of the run starts the clock."""
        if self.since is None:
            jax.block_until_ready(out)
            self.clock, self.since = time.perf_counter(), step

    def flushed(self, step: int) -> None:
        self.clock, self.since = time.perf_counter(), step

    def since_flush(self, step: int, records: dict[int, Any] | None = None) -> dict[str, float]:
        """The figures of steps ``since+1 .. step`` (results fetched: ``records`` maps
        steps to their metrics); those of the first step, compilation included, if it is
        the only one."""
        steps = step - self.since
        seconds = time.perf_counter() - self.clock
        first = step - steps + 1
        if steps == 0:  # (the run's first step is a log step)
            steps, first = 1, step
        step_s = seconds / steps
        counted = [records[s]["tokens"] for s in range(first, step + 1) if s in (records or {})]
        tokens = float(np.mean(counted)) if len(counted) == steps else self.tokens
        row = {
            "step_time_s": step_s,
            "tokens_per_sec": tokens / step_s,
            "tflops_per_device": self.executed / step_s / self.devices / 1e12,
        }
        if self.peak:
            row["mfu"] = self.model / step_s / (self.devices * self.peak)
        return row

    @staticmethod
    def postfix(row: dict[str, float]) -> dict[str, str]:
        out = {"loss": f"{row['loss']:.3f}", "tok_s": f"{row['tokens_per_sec']:.0f}"}
        out["tflop_s"] = f"{row['tflops_per_device']:.3g}"
        if "mfu" in row:
            out["mfu"] = f"{row['mfu']:.1%}"
        return out


class Profile:
    """A ``jax.profiler`` trace of steps ``a..b`` (``train.profile_steps``) under
    ``<workdir>/profile`` (TensorBoard's profile plugin or Perfetto read it); a no-op
    for ``()``. The trace is written by the first process."""

    def __init__(self, workdir: str, steps: Any):
        self.steps = tuple(int(s) for s in steps) if steps else ()
        self.dir = str(epath.Path(workdir) / "profile")
        self.on = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and jax.process_index() == 0:
            jax.profiler.start_trace(self.dir)
            self.on = True

    def after(self, step: int, out: Any) -> None:
        if self.on and step == self.steps[1]:
            jax.block_until_ready(out)
            self.close()

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False


def evaluate_workdir(
    config: ml_collections.ConfigDict, workdir: str, num_batches: int | None = None
) -> dict[str, float]:
    """``step``, ``eval_loss`` and ``eval_ppl`` of the newest checkpoint in ``workdir``."""
    trainer = Trainer(config, workdir)
    _, params, _, step = checkpoint.open_model(workdir, shardings=trainer.shardings.params)
    return {"step": step, **trainer.evaluate(params, num_batches)}
