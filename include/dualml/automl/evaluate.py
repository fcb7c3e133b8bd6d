"""The model evaluation Vertex AI attaches to an AutoML classification model, from test-split scores.

Vertex's classification metrics schema (``classification_metrics_1.0.0.yaml``): ``auPrc``, ``auRoc``
and ``logLoss`` (micro-averaged over one-vs-rest scores), ``confidenceMetrics`` (precision / recall
/ F1 of the predictions at or above each confidence threshold, and of the top-1 prediction) and the
``confusionMatrix`` of the top-1 predictions with its ``annotationSpecs``. Pure numpy.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(x)
    return float(np.trapezoid(y[order], x[order]))


def classification_metrics(probs: np.ndarray, y_true: np.ndarray, annotation_specs: list[dict]) -> dict:
    """Metrics for ``probs`` [N, C] (columns in ``annotation_specs`` order) against class indices ``y_true``."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    n, c = probs.shape
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), y_true] = 1.0
    top1 = probs.argmax(axis=1)
    cm = np.zeros((c, c), dtype=int)
    np.add.at(cm, (y_true, top1), 1)

    confidence_metrics = []
    pr_points = []
    for t in THRESHOLDS:
        predicted = probs >= t
        tp = float((predicted & (onehot == 1)).sum())
        fp = float((predicted & (onehot == 0)).sum())
        fn = float((~predicted & (onehot == 1)).sum())
        tn = float((~predicted & (onehot == 0)).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        fpr = fp / (fp + tn) if fp + tn else 0.0
        at1 = predicted[np.arange(n), top1]  # the top-1 prediction, if it clears the threshold
        tp1 = float((at1 & (top1 == y_true)).sum())
        p1 = tp1 / float(at1.sum()) if at1.sum() else 1.0
        r1 = tp1 / n if n else 0.0
        confidence_metrics.append({
            "confidenceThreshold": t, "precision": precision, "recall": recall, "falsePositiveRate": fpr,
            "f1Score": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "precisionAt1": p1, "recallAt1": r1, "f1ScoreAt1": 2 * p1 * r1 / (p1 + r1) if p1 + r1 else 0.0,
        })
        pr_points.append((recall, precision, fpr))
    recalls, precisions, fprs = (np.array(v) for v in zip(*pr_points, strict=True))
    eps = 1e-15
    return {
        "auPrc": _auc(recalls, precisions),
        "auRoc": _auc(fprs, recalls),
        "logLoss": float(-np.mean(np.log(np.clip(probs[np.arange(n), y_true], eps, 1.0)))),
        "confidenceMetrics": confidence_metrics,
        "confusionMatrix": {
            "annotationSpecs": [{"id": str(s["id"]), "displayName": s["displayName"]} for s in annotation_specs],
            "rows": cm.tolist(),
        },
    }


def accuracy(metrics: dict) -> float:
    rows = np.array(metrics["confusionMatrix"]["rows"])
    return float(np.trace(rows) / rows.sum()) if rows.sum() else 0.0
