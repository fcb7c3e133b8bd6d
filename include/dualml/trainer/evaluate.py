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
