"""Run ``dualml.trainer``'s entrypoint with timestamps around its phases (used by trainer_profile.py).

``python bench/trainer_probe.py OUT.json <trainer args...>`` behaves like ``python -m dualml.trainer
<trainer args...>`` (same ``main``, same exit code) and writes to OUT.json the wall clock
(``time.time()``) and process CPU seconds (``time.process_time()``, all threads) at each event:
probe start, imports done, ``run`` entered, model build started, each ``fit``'s epochs (begin, first
training step done, validation begin/end, end), ``fit`` returned, serving export, ``model.keras``
save, export check, uploads, ``run`` returned. The events come from wrapping public entry points
(``keras.Model.fit`` / ``predict``, ``keras.saving.save_model``, ``dualml.storage.upload_dir``) and the
trainer's own functions by name, so the same probe times the current tree and an older one
(``--baseline-ref``) the same way. Wrapping adds a few microseconds per call.
"""

from __future__ import annotations

import functools
import json
import sys
import time

EVENTS: list[dict] = []


def event(name: str, **extra) -> None:
    EVENTS.append({"name": name, "t": time.time(), "cpu": time.process_time(), **extra})


def _wrap(owner, attr: str, name: str) -> None:
    """Record ``<name>_start`` / ``<name>_end`` around ``owner.attr`` (skipped if it is missing)."""
    fn = getattr(owner, attr, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        event(f"{name}_start")
        try:
            return fn(*args, **kwargs)
        finally:
            event(f"{name}_end")

    setattr(owner, attr, wrapper)


def _instrument() -> None:
    import keras

    from dualml import storage
    from dualml.trainer import export, models, task

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._first = True
            event("epoch_begin", epoch=epoch)

        def on_train_batch_end(self, batch, logs=None):
            if self._first:
                self._first = False
                event("first_step_end")

        def on_test_begin(self, logs=None):
            event("validation_begin")

        def on_test_end(self, logs=None):
            event("validation_end")

        def on_epoch_end(self, epoch, logs=None):
            event("epoch_end", epoch=epoch)

    fit = keras.Model.fit

    @functools.wraps(fit)
    def timed_fit(self, *args, **kwargs):
        # Last, so that an epoch ends after the trainer's own epoch-end work (checkpoint sync).
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Timer()]
        event("fit_start")
        try:
            return fit(self, *args, **kwargs)
        finally:
            event("fit_end")

    keras.Model.fit = timed_fit
    _wrap(keras.Model, "predict", "predict")
    _wrap(keras.saving, "save_model", "save_keras")
    _wrap(models, "build_classifier", "build")
    _wrap(export, "export_serving_model", "export_savedmodel")
    _wrap(task, "_check_export", "export_check")
    _wrap(task, "run", "run")
    _wrap(storage, "upload_dir", "upload")


def main(argv: list[str]) -> int:
    out, trainer_args = argv[0], argv[1:]
    event("probe_start")
    import keras  # noqa: F401  (the imports a trainer process pays before any work)
    import tensorflow  # noqa: F401

    from dualml.trainer import task

    event("imports_end")
    _instrument()
    rc = 1
    try:
        rc = task.main(trainer_args)
    finally:
        event("main_end")
        with open(out, "w") as f:
            json.dump({"rc": rc, "events": EVENTS}, f)
    # As ``python -m dualml.trainer`` ends (trees without exit_process return normally).
    getattr(task, "exit_process", lambda code: None)(rc)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
