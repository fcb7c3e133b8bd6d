"""Cost per run from measured step durations, the configured machines and a price table.

Training cost of a target = hours of its train step x replicas x (machine + accelerators).
On the local platform the same arithmetic answers "what would this run cost on Vertex AI with
the configured machines", using the local durations (an estimate, labelled as such: a GPU
trains much faster than 2 CPU cores). Serving is an ongoing cost, reported per hour and per
30-day month for the endpoint's minimum replicas.
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


def serving_cost(*, region: str, machine_type: str, min_replica_count: int, prices: dict) -> dict:
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
        if seconds is not None:
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
