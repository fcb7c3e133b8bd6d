"""Classification metrics on the held-out test split, written as ``metrics.json``."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix.

    ``confusion_matrix[i][j]`` counts examples of true class i predicted as class j.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    n = len(labels)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    for i, name in enumerate(labels):
        tp = int(cm[i, i])
        predicted = int(cm[:, i].sum())
        actual = int(cm[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = int(cm.sum())
    return {
        "num_examples": total,
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if per_class else 0.0,
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


def predict_batches(infer, batches) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over ``batches`` of (images, labels), in order, in one pass
    through ``infer`` (see ``dualml.trainer.export.inference_fn``: traced once)."""
    ys, probs = [], []
    for images, y in batches:
        probs.append(np.asarray(infer(images)))
        ys.append(np.asarray(y))
    return np.concatenate(ys), np.concatenate(probs)


def evaluate_keras_model(model_path: str, files: list[tuple[str, int]], labels: list[str],
                         batch_size: int = 32) -> dict:
    """Re-evaluate a saved ``model.keras`` on (image path, class index) pairs, e.g. to compare a
    serving champion with a challenger on the challenger's held-out test split."""
    import keras

    from dualml.preprocess import load_image
    from dualml.trainer.export import inference_fn

    model = keras.saving.load_model(model_path, compile=False)
    size = int(model.inputs[0].shape[1])
    infer = inference_fn(model, size)  # one trace whatever the number of images
    images = np.stack([load_image(path, size) for path, _ in files])
    probs = np.concatenate([np.asarray(infer(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    return classification_metrics([i for _, i in files], probs.argmax(axis=-1), labels)
