"""A stand-in for the AutoML search image (``python -m dualml.automl``) in tests of the AutoML API path:
the same arguments and output contract, no TensorFlow. Every test item is predicted right except
every ``FAKE_MISS_EVERY``-th one; the SavedModel and .tflite are placeholders (export tests check
where files land, not what they compute); ``args.json`` records what the server asked for.

Time: one "trial" takes ``FAKE_SECONDS_PER_ITEM`` x training items; when that exceeds the time
limit the budget is exhausted (exit 4), as the real search reports it. ``FAKE_SLEEP`` seconds of
training otherwise (to cancel or fail a running pipeline).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "include"))
from dualml.automl.evaluate import classification_metrics  # noqa: E402 - numpy only

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--model-type", required=True)
p.add_argument("--time-limit-s", type=float, required=True)
p.add_argument("--output-dir", required=True)
p.add_argument("--disable-early-stopping", action="store_true")
a = p.parse_args()
out = a.output_dir
with open(os.path.join(out, "args.json"), "w") as f:
    json.dump(vars(a), f)
data = json.load(open(a.data))
specs = data["annotationSpecs"]
index = {s["id"]: i for i, s in enumerate(specs)}
items = {u: [(it["uri"], index[it["annotationSpecId"]]) for it in data["items"] if it["mlUse"] == u]
         for u in ("training", "validation", "test")}
with open(os.path.join(out, "split.json"), "w") as f:
    json.dump(items, f)

trial = float(os.environ.get("FAKE_SECONDS_PER_ITEM", "0")) * len(items["training"])
if trial > a.time_limit_s:
    time.sleep(a.time_limit_s)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"state": "FAILED", "code": "RESOURCE_EXHAUSTED",
                   "message": f"no candidate finished within {a.time_limit_s:.1f} s"}, f)
    print("budget exhausted", flush=True)
    sys.exit(4)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")) + trial)

miss = int(os.environ.get("FAKE_MISS_EVERY", "0"))
y = np.array([i for _, i in items["test"]])
pred = y.copy()
if miss:
    pred[::miss] = (pred[::miss] + 1) % len(specs)
probs = np.full((len(y), len(specs)), 0.1 / max(1, len(specs) - 1))
probs[np.arange(len(y)), pred] = 0.9
with open(os.path.join(out, "evaluation.json"), "w") as f:
    json.dump({"metrics": classification_metrics(probs, y, specs), "numExamples": len(y)}, f)
os.makedirs(os.path.join(out, "saved_model", "variables"))
open(os.path.join(out, "saved_model", "saved_model.pb"), "wb").write(b"fake saved model")
open(os.path.join(out, "saved_model", "variables", "variables.index"), "wb").write(b"fake")
json.dump(specs, open(os.path.join(out, "saved_model", "annotation_specs.json"), "w"))
if a.model_type != "CLOUD":
    os.makedirs(os.path.join(out, "tflite"))
    open(os.path.join(out, "tflite", "model.tflite"), "wb").write(b"\0\0\0\0TFL3fake")
    open(os.path.join(out, "tflite", "dict.txt"), "w").write("".join(s["displayName"] + "\n" for s in specs))
    open(os.path.join(out, "tflite", "tflite_metadata.json"), "w").write("{}")
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump({"state": "SUCCEEDED", "stopReason": "MODEL_CONVERGED", "searchSeconds": trial,
               "best": {"key": "fake"}, "trials": 1}, f)
print("trained", flush=True)
