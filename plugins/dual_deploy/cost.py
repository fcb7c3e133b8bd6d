"""Cost per run from measured step durations, the configured machines and a price table.

Training cost of a target = hours of its train step x replicas x (machine + accelerators).
On the local platform the same arithmetic answers "what would this run cost on Vertex AI with
the configured machines", using the local durations (an estimate, labelled as such: a GPU
trains much faster than 2 CPU cores). Serving is an ongoing cost, reported per hour and per
30-day month for the endpoint's minimum replicas.

An AutoML target is priced as Vertex AI bills AutoML: the node hours its training pipeline reports
(``cost_milli_node_hours``, at most the budget; locally what the search's time stands for) times its
model type's node-hour rate, and serving per replica node hour (``automl:`` in prices.yaml).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

DEFAULT_PRICES = Path(__file__).resolve().parents[2] / "dags" / "config" / "prices.yaml"


class PriceError(KeyError):
    """A machine or accelerator has no price for the region: add it to prices.yaml."""


@lru_cache(maxsize=4)
def load_prices(path: str | None = None) -> dict:
    with open(path or DEFAULT_PRICES) as f:
        return yaml.safe_load(f)


def _rate(table: dict, region: str, kind: str, name: str, spot: bool) -> float:
    try:
        entry = table["regions"][region][kind][name]
    except KeyError:
        raise PriceError(f"no {kind} price for {name!r} in region {region!r}: add it to prices.yaml") from None
    key = "spot" if spot and "spot" in entry else "on_demand"
    return float(entry[key])


def training_cost(seconds: float, *, region: str, machine_type: str, accelerator_type: str | None,
                  accelerator_count: int, replica_count: int, spot: bool, prices: dict) -> dict:
    hourly = _rate(prices, region, "machines", machine_type, spot)
    if accelerator_type and accelerator_count:
        hourly += accelerator_count * _rate(prices, region, "accelerators", accelerator_type, spot)
    hourly *= replica_count
    hours = seconds / 3600.0
    return {"hours": round(hours, 4), "hourly_usd": round(hourly, 4), "usd": round(hours * hourly, 4),
            "machine_type": machine_type, "accelerator": f"{accelerator_count} x {accelerator_type}"
            if accelerator_type and accelerator_count else None, "replicas": replica_count, "spot": spot}


def _automl_rate(table: dict, region: str, key: str) -> float:
    try:
        return float(table["regions"][region]["automl"][key])
    except KeyError:
        raise PriceError(f"no AutoML price {key!r} in region {region!r}: add it under automl: in prices.yaml") from None


def automl_training_cost(cost_milli_node_hours: int | None, seconds: float | None, *, region: str, model_type: str,
                         budget_milli_node_hours: int | None = None, prices: dict) -> dict:
    """AutoML training: node hours used (milli node hours / 1000) x the model type's node-hour rate."""
    rate = _automl_rate(prices, region, "image_training" if model_type == "CLOUD" else "image_training_edge")
    node_hours = (cost_milli_node_hours or 0) / 1000.0
    return {"method": "automl", "model_type": model_type, "node_hours": round(node_hours, 4),
            "cost_milli_node_hours": cost_milli_node_hours, "budget_milli_node_hours": budget_milli_node_hours,
            "hours": round((seconds or 0) / 3600.0, 4), "hourly_usd": rate, "usd": round(node_hours * rate, 4),
            "machine_type": f"AutoML {model_type}", "accelerator": None, "replicas": None, "spot": False}


def serving_cost(*, region: str, machine_type: str, min_replica_count: int, prices: dict) -> dict:
    if machine_type == "automl":  # a deployed AutoML model: per replica node hour
        hourly = _automl_rate(prices, region, "image_online_prediction") * min_replica_count
        return {"machine_type": "AutoML (automatic resources)", "replicas": min_replica_count,
                "hourly_usd": round(hourly, 4), "monthly_usd": round(hourly * 24 * 30, 2)}
    hourly = _rate(prices, region, "prediction_machines", machine_type, False) * min_replica_count
    return {"machine_type": machine_type, "replicas": min_replica_count, "hourly_usd": round(hourly, 4),
            "monthly_usd": round(hourly * 24 * 30, 2)}


def run_cost(summary: dict, cost_inputs: dict, *, region: str, prices: dict | None = None) -> dict:
    """Per-target and total cost of a run. ``cost_inputs[target]`` holds the target's training
    machine settings (and ``endpoint`` settings for endpoint targets); durations come from the
    summary's steps (``<target>.train``).

    A machine or accelerator missing from the price table leaves that figure out and adds a line
    to ``warnings`` (the total then covers only what could be priced: ``complete`` is False).
    """
    prices = prices or load_prices()
    out: dict = {"currency": prices.get("currency", "USD"), "region": region, "targets": {},
                 "estimate_only": summary.get("platform") != "gcp", "reference": prices.get("reference", {}),
                 "warnings": []}
    total = 0.0
    for name, inputs in cost_inputs.items():
        seconds = (summary.get("steps", {}).get(f"{name}.train") or {}).get("duration_s")
        entry: dict = {}
        automl = inputs["training"].get("automl")
        if automl:
            trained = (summary.get("targets", {}).get(name) or {}).get("training") or {}
            if trained.get("cost_milli_node_hours") is not None:
                try:
                    entry["training"] = automl_training_cost(trained["cost_milli_node_hours"], seconds, region=region,
                                                             prices=prices, **automl)
                    total += entry["training"]["usd"]
                except PriceError as e:
                    out["warnings"].append(f"{name} training not priced: {e.args[0]}")
        elif seconds is not None:
            try:
                entry["training"] = training_cost(seconds, region=region, prices=prices, **inputs["training"])
                total += entry["training"]["usd"]
            except PriceError as e:
                out["warnings"].append(f"{name} training not priced: {e.args[0]}")
        if inputs.get("endpoint"):
            try:
                entry["serving"] = serving_cost(region=region, prices=prices, **inputs["endpoint"])
            except PriceError as e:
                out["warnings"].append(f"{name} serving not priced: {e.args[0]}")
        out["targets"][name] = entry
    out["training_total_usd"] = round(total, 4)
    out["complete"] = not out["warnings"]
    return out
