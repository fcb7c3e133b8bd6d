"""``python -m dualml.automl``: one AutoML image classification training, as the local Vertex AI
server's training pipeline runs it (its "image", see emulators/localcloud.yaml).

Input (``--data``, written by the server from the dataset's data items and the pipeline's split)::

    {"annotationSpecs": [{"id": "1", "displayName": "daisy"}, ...],
     "items": [{"uri": "gs://.../a.jpg", "annotationSpecId": "1", "mlUse": "training"}, ...]}

Output (``--output-dir``): ``saved_model/`` (+ ``annotation_specs.json``), for edge model types
``tflite/``, ``evaluation.json`` (Vertex's classification metrics on the test items),
``search.json`` (every trial) and, last, ``result.json``. Exit codes: 0 trained; 4 the budget was
exhausted before a model was trained; 2 unusable input; anything else: the training failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time

EXIT_BAD_INPUT = 2
EXIT_BUDGET_EXHAUSTED = 4
ML_USES = ("training", "validation", "test")
MAX_CALIBRATION_IMAGES = 100


def _write_json(out_dir: str, name: str, obj) -> None:
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, name))


def load_items(path: str) -> tuple[list[dict], dict[str, list[tuple[str, int]]]]:
    """(annotation specs, {ml use: [(uri, class index)]}) from the server's data file."""
    with open(path) as f:
        data = json.load(f)
    specs = list(data.get("annotationSpecs") or [])
    index = {str(s["id"]): i for i, s in enumerate(specs)}
    splits: dict[str, list[tuple[str, int]]] = {u: [] for u in ML_USES}
    for item in data.get("items") or []:
        if item.get("mlUse") in splits and str(item.get("annotationSpecId")) in index:
            splits[item["mlUse"]].append((item["uri"], index[str(item["annotationSpecId"])]))
    if len(specs) < 2:
        raise ValueError(f"{len(specs)} label(s): a classifier needs at least 2")
    empty = [u for u in ML_USES if not splits[u]]
    if empty:
        raise ValueError(f"no {' / '.join(empty)} items: every split needs images")
    return specs, splits


def main(argv=None) -> int:
    start = time.monotonic()  # the budget counts from here: start-up and data loading are training time too
    p = argparse.ArgumentParser(prog="python -m dualml.automl", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the server's data file (JSON, see above)")
    p.add_argument("--model-type", required=True)
    p.add_argument("--time-limit-s", type=float, required=True,
                   help="wall-clock budget, counted from the start of this process (the server maps "
                        "budget_milli_node_hours to it)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--disable-early-stopping", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    log = logging.getLogger("dualml.automl")
    from dualml.automl import space

    os.makedirs(a.output_dir, exist_ok=True)
    try:
        space.check_model_type(a.model_type)
        specs, splits = load_items(a.data)
    except (ValueError, OSError, KeyError) as e:
        log.error("unusable input: %s", e)
        _write_json(a.output_dir, "result.json", {"state": "FAILED", "code": "INVALID_ARGUMENT", "message": str(e)})
        return EXIT_BAD_INPUT
    limit = a.time_limit_s
    log.info("%s, time limit %.0f s; %s items", a.model_type, limit, {u: len(v) for u, v in splits.items()})
    try:
        result = train(a, specs, splits, deadline=start + limit, log=log)
    except _Exhausted as e:
        seconds = time.monotonic() - start
        log.error("%s", e)
        _write_json(a.output_dir, "result.json", {"state": "FAILED", "code": "RESOURCE_EXHAUSTED",
                                                  "message": str(e), "seconds": round(seconds, 1)})
        return EXIT_BUDGET_EXHAUSTED
    seconds = time.monotonic() - start
    result.update(state="SUCCEEDED", seconds=round(seconds, 1))
    _write_json(a.output_dir, "result.json", result)
    log.info("done in %.0f s (limit %.0f s): %s", seconds, limit, json.dumps(
        {k: result[k] for k in ("stopReason", "searchSeconds", "testAccuracy")}))
    return 0


class _Exhausted(RuntimeError):
    pass


def train(a, specs: list[dict], splits: dict, deadline: float, log) -> dict:
    import numpy as np

    from dualml.automl import evaluate, export
    from dualml.automl.search import BudgetExhausted, run_search
    from dualml.trainer import data_pipeline as dp

    labels = [s["displayName"] for s in specs]
    # One download of every image (content-keyed cache shared with the custom trainer).
    uris = list(dict.fromkeys(u for items in splits.values() for u, _ in items))
    local = dict(zip(uris, dp.localize(uris), strict=True))
    train_items, val_items, test_items = ([(local[u], i) for u, i in splits[m]] for m in ML_USES)
    try:
        found = run_search(train_items, val_items, len(labels), a.model_type, deadline, seed=a.seed,
                           early_stopping=not a.disable_early_stopping)
    except BudgetExhausted as e:
        raise _Exhausted(f"the training budget was exhausted before a model was trained: {e}") from None
    best = found.best
    _write_json(a.output_dir, "search.json", found.summary())

    size = best.candidate.image_size
    test_ds = dp.image_dataset(test_items, image_size=size, batch_size=32, training=False)
    probs = best.model.predict(test_ds, verbose=0)
    metrics = evaluate.classification_metrics(probs, np.array([i for _, i in test_items]), specs)
    _write_json(a.output_dir, "evaluation.json", {"metrics": metrics, "numExamples": len(test_items)})

    saved = os.path.join(a.output_dir, export.SAVED_MODEL_DIR)
    export.export_saved_model(best.model, labels, size, saved)
    _write_json(saved, export.SPECS_FILE, specs)
    if a.model_type != "CLOUD":
        from dualml.preprocess import load_image

        chosen = random.Random(a.seed).sample(train_items, min(MAX_CALIBRATION_IMAGES, len(train_items)))
        calibration = np.stack([load_image(p, size) for p, _ in chosen])
        export.export_tflite(best.model, labels, size, calibration, os.path.join(a.output_dir, export.TFLITE_DIR))
    return {"modelType": a.model_type, "stopReason": found.stop_reason, "searchSeconds": round(found.seconds, 1),
            "best": best.summary(), "trials": len(found.trials), "imageSize": size,
            "testAccuracy": evaluate.accuracy(metrics),
            "exports": ["tf-saved-model", *(["tflite"] if a.model_type != "CLOUD" else [])]}


if __name__ == "__main__":
    from dualml.quiet_tf import import_tensorflow

    import_tensorflow()
    sys.exit(main())
