"""Budget-bounded model search: successive halving over ``space.candidates`` under a wall-clock limit.

Why successive halving and not KerasTuner: the budget here is wall-clock time (Vertex's node hours),
and KerasTuner's tuners allocate trials and epochs, not seconds; with a time limit, early rungs
must stay cheap and the survivors get what is left. The algorithm (Jamieson & Talwalkar 2016):

1. rung 0: candidates, in the space's seeded order, train ``RUNG0_EPOCHS`` epochs each while rung 0
   has not used ``RUNG0_SHARE`` of the time (at least one candidate, even if that takes longer);
2. the best half (validation accuracy, ties: lower validation loss) trains on to twice the epochs;
   repeat until one is left;
3. the last one trains on, doubling its epochs, until the time is up or (unless early stopping is
   disabled) an extension no longer improves its validation accuracy: the model converged.

Every epoch ends with a validation pass; each trial keeps the weights of its best epoch. A deadline
check after every batch stops a trial the moment the time is up (that partial epoch does not
count). Nothing finished by the deadline means the budget was exhausted (``BudgetExhausted``). The
winner is evaluated on the test items (``evaluate.py``) and exported (``export.py``).

Deterministic given the data, the seed and the same timing: candidates are tried in a seeded order
and each model is built and trained with seeds derived from it; which candidates fit in the time
depends on the machine's speed.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dualml.automl.space import Candidate, candidates

log = logging.getLogger("dualml.automl")

RUNG0_EPOCHS = 2
RUNG0_SHARE = 0.4  # rung 0 stops starting candidates once it used this share of the time
BATCH_SIZE = 16
MIN_IMPROVEMENT = 0.005  # a validation-accuracy gain below this is no improvement (convergence)

BUDGET_REACHED = "BUDGET_REACHED"
MODEL_CONVERGED = "MODEL_CONVERGED"


class BudgetExhausted(RuntimeError):
    """The time limit passed before any candidate finished an epoch: no model to deliver."""


class _Deadline(Exception):
    pass


@dataclass
class Trial:
    candidate: Candidate
    index: int
    model: object = None
    epochs: int = 0  # completed epochs
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    best_weights: list | None = None
    seconds: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)
    rungs: int = 0
    stopped: str | None = None  # why it stopped training early (deadline)

    @property
    def score(self) -> tuple[float, float]:
        return (self.best_val_accuracy, -self.best_val_loss)

    def summary(self) -> dict:
        return {"candidate": self.candidate.to_dict(), "key": self.candidate.key, "epochs": self.epochs,
                "best_epoch": self.best_epoch, "val_accuracy": round(self.best_val_accuracy, 4),
                "val_loss": round(self.best_val_loss, 4), "seconds": round(self.seconds, 1), "rungs": self.rungs,
                "stopped": self.stopped}


@dataclass
class SearchResult:
    best: Trial
    trials: list[Trial]
    stop_reason: str
    seconds: float

    def summary(self) -> dict:
        return {"best": self.best.summary(), "stop_reason": self.stop_reason, "seconds": round(self.seconds, 1),
                "trials": [t.summary() for t in self.trials]}


class Datasets:
    """Train/validation tf.data pipelines per image size, built once (decoded images are cached)."""

    def __init__(self, train: list[tuple[str, int]], val: list[tuple[str, int]], seed: int,
                 cache_dir: str | None = None):
        self.train, self.val, self.seed, self.cache_dir = train, val, seed, cache_dir
        self._by_size: dict[int, tuple] = {}

    def get(self, image_size: int):
        if image_size not in self._by_size:
            from dualml.trainer import data_pipeline as dp

            common = dict(image_size=image_size, batch_size=BATCH_SIZE, seed=self.seed, cache_dir=self.cache_dir)
            self._by_size[image_size] = (dp.image_dataset(self.train, training=True, augment=True, **common),
                                         dp.image_dataset(self.val, training=False, **common))
        return self._by_size[image_size]


def _callbacks(trial: Trial, deadline: float):
    import keras

    class Watch(keras.callbacks.Callback):
        """Stop at the deadline; keep the weights of the best epoch."""

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() >= deadline:
                raise _Deadline()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            trial.epochs = epoch + 1
            for k, v in logs.items():
                trial.history.setdefault(k, []).append(float(v))
            acc, loss = float(logs.get("val_accuracy", -1)), float(logs.get("val_loss", float("inf")))
            if (acc, -loss) > trial.score:
                trial.best_val_accuracy, trial.best_val_loss, trial.best_epoch = acc, loss, epoch + 1
                trial.best_weights = [w.copy() for w in self.model.get_weights()]

    return [Watch()]


def _build(trial: Trial, num_classes: int, seed: int):
    import keras

    from dualml.trainer.models import build_classifier

    c = trial.candidate
    keras.utils.set_random_seed(seed * 1000 + trial.index)
    # From scratch (nothing can be downloaded locally): BatchNorm statistics must follow the data fast.
    model, _ = build_classifier(c.architecture, num_classes, c.image_size, weights=None, dropout=c.dropout,
                                bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(c.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    # Variables the train step needs, made now: created inside its first trace, they would make Keras trace it
    # twice (each candidate's first epoch pays that tracing, a large part of it on 2 cores).
    model.optimizer.build(model.trainable_variables)
    return model


def _train(trial: Trial, data: Datasets, num_classes: int, seed: int, to_epochs: int, deadline: float) -> bool:
    """Train ``trial`` on to ``to_epochs`` completed epochs (resuming). False if the deadline stopped it."""
    if time.monotonic() >= deadline:  # not even worth building the model
        trial.stopped = "deadline"
        return False
    if trial.model is None:
        trial.model = _build(trial, num_classes, seed)
    train_ds, val_ds = data.get(trial.candidate.image_size)
    t0 = time.monotonic()
    try:
        trial.model.fit(train_ds, validation_data=val_ds, initial_epoch=trial.epochs, epochs=to_epochs,
                        callbacks=_callbacks(trial, deadline), verbose=0)
        done = True
    except _Deadline:
        trial.stopped = "deadline"
        done = False
    trial.seconds += time.monotonic() - t0
    trial.rungs += 1
    log.info("trial %d %s: %d epochs, best val_accuracy %.4f (epoch %d), %.1f s%s", trial.index,
             trial.candidate.key, trial.epochs, trial.best_val_accuracy, trial.best_epoch, trial.seconds,
             "" if done else " (stopped at the deadline)")
    return done


def _release(trial: Trial) -> None:
    """Free a discarded trial's model (its summary stays)."""
    trial.model = None
    trial.best_weights = None
    gc.collect()


def run_search(train: list[tuple[str, int]], val: list[tuple[str, int]], num_classes: int, model_type: str,
               deadline: float, *, seed: int = 0, early_stopping: bool = True, cache_dir: str | None = None,
               space: Callable[[str, int], list[Candidate]] = candidates) -> SearchResult:
    """Search until ``deadline`` (a ``time.monotonic()`` value); the best trial has its best weights set."""
    start = time.monotonic()
    total = max(deadline - start, 1e-6)
    data = Datasets(train, val, seed, cache_dir)
    pool = space(model_type, seed)
    trials: list[Trial] = []
    stop_reason = BUDGET_REACHED
    log.info("searching %d candidates of %s for %.0f s: %s", len(pool), model_type, total,
             ", ".join(c.key for c in pool))

    # rung 0: cheap look at as many candidates as the rung's share of the time allows
    for i, c in enumerate(pool):
        if trials and time.monotonic() - start >= RUNG0_SHARE * total:
            break
        trial = Trial(c, i)
        trials.append(trial)
        _train(trial, data, num_classes, seed, RUNG0_EPOCHS, deadline)
        if time.monotonic() >= deadline:
            break
    finished = [t for t in trials if t.epochs > 0]
    if not finished:
        raise BudgetExhausted(
            f"the time limit ({total:.0f} s) passed before any candidate finished an epoch "
            f"(first candidate: {pool[0].key}); increase budget_milli_node_hours")

    # halving: the better half trains on to twice the epochs, until one is left
    alive = sorted(finished, key=lambda t: t.score, reverse=True)
    epochs = RUNG0_EPOCHS
    while len(alive) > 1 and time.monotonic() < deadline:
        keep = alive[: max(1, len(alive) // 2)]
        for t in alive[len(keep):]:
            _release(t)
        epochs *= 2
        for t in keep:
            if time.monotonic() >= deadline:
                break
            _train(t, data, num_classes, seed, epochs, deadline)
        alive = sorted(keep, key=lambda t: t.score, reverse=True)
    for t in alive[1:]:
        _release(t)
    best = alive[0]

    # the winner trains on until the time is up or it stops improving
    while time.monotonic() < deadline:
        before = best.best_val_accuracy
        target = max(best.epochs * 2, best.epochs + RUNG0_EPOCHS)
        if not _train(best, data, num_classes, seed, target, deadline):
            break
        if early_stopping and (best.best_val_accuracy - before < MIN_IMPROVEMENT or best.best_val_accuracy >= 1.0):
            stop_reason = MODEL_CONVERGED
            break
    if best.best_weights is not None:
        best.model.set_weights(best.best_weights)
    seconds = time.monotonic() - start
    log.info("best: %s, val_accuracy %.4f after %d epochs (%s, %.0f s)", best.candidate.key, best.best_val_accuracy,
             best.best_epoch, stop_reason, seconds)
    return SearchResult(best=best, trials=trials, stop_reason=stop_reason, seconds=seconds)
