"""Where a trainer process spends its time, phase by phase, for the local platform's two targets.

Each run is a real ``python -m dualml.trainer`` process (through ``bench/trainer_probe.py``, which
timestamps its phases) with the local platform's arguments from ``dags/config/dual_deploy.yaml``
(``platforms.local``: DenseNet121 64 px batch 16 5 epochs, MobileNetV3-Small 96 px batch 16 6 epochs,
weights none, deterministic), on the sample data (``dualml.sample_data``, 60 images per class) and
the split the local platform stages. By default everything is on gs:// as in ``make run``: data and
``split.json`` in a GCS emulator started for the benchmark (in memory), the model, checkpoints and
TensorBoard logs in AIP_MODEL_DIR / AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR there, and a fresh
download cache per run (``--local`` uses local folders instead).

Phases (wall and CPU seconds of the trainer process, CPU summed over its threads): ``startup``
(interpreter), ``import`` (tensorflow + keras + the trainer), ``data`` (arguments, strategy, split,
data staging, tf.data pipelines), ``build`` (model, compile, checkpoint restore), ``first_epoch``
(includes tracing the train and validation steps; its first step and its validation are also given
alone), ``later_epochs`` (the others; their mean is the steady-state epoch), ``fit_other`` (fit's
set-up and end: restoring the best weights...), ``evaluate`` (test split), ``export_savedmodel``,
``export_keras`` (model.keras), ``export_check``, ``write`` (metrics/history/config files and the
upload to AIP_MODEL_DIR) and ``exit`` (interpreter shutdown). ``checkpoint_sync_s`` is the part of
the epochs spent uploading checkpoints and logs after each epoch.

The anchor is the steady-state training compute measured in the same process: epochs x the mean
later epoch. ``--baseline-ref REF`` also runs the trainer of an older commit (its ``include/`` from
``git archive``), alternating with the current tree in each round, so before/after figures come
from the same run. The 1-minute load average before and after each process is recorded: the
machine is shared, and the CPU seconds are the steadier figure under load.

``python bench/trainer_profile.py [--data DIR] [--rounds N] [--baseline-ref REF] [--local]
[--only densenet121,mobilenet_v3_small] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import benchlib

PHASES = ("startup", "import", "data", "build", "first_epoch", "later_epochs", "fit_other", "evaluate",
          "export_savedmodel", "export_keras", "export_check", "write", "exit")
TIMEOUT_S = 30 * 60


# --- phases from the probe's events -----------------------------------------------------------------


def _first(events: list[dict], name: str, after: float = 0.0) -> dict | None:
    return next((e for e in events if e["name"] == name and e["t"] >= after), None)


def phases_from_events(events: list[dict], spawned_at: float, exited_at: float) -> dict:
    """{phase: {"wall_s", "cpu_s"}} plus epoch details, from trainer_probe.py's events.

    Phases are the intervals between consecutive boundary events; ``startup`` and ``exit`` are
    measured from the parent (spawn -> probe start, main returned -> process gone); their CPU is
    only known together (the process's total CPU minus the phases').
    """
    ev = {e["name"]: e for e in reversed(events)}  # first occurrence of each name
    missing = {"probe_start", "imports_end", "build_start", "fit_start", "fit_end", "main_end"} - set(ev)
    if missing:
        raise ValueError(f"the trainer did not reach {', '.join(sorted(missing))}")
    epochs_begin = [e for e in events if e["name"] == "epoch_begin"]
    epochs_end = [e for e in events if e["name"] == "epoch_end"]
    if not epochs_begin or len(epochs_begin) != len(epochs_end):
        raise ValueError(f"incomplete epoch events ({len(epochs_begin)} begin, {len(epochs_end)} end)")
    fit_start, fit_end = ev["fit_start"], [e for e in events if e["name"] == "fit_end"][-1]
    export_start = ev.get("export_savedmodel_start")
    bounds = [
        ("import", ev["probe_start"], ev["imports_end"]),
        ("data", ev["imports_end"], ev["build_start"]),
        ("build", ev["build_start"], fit_start),
        ("first_epoch", epochs_begin[0], epochs_end[0]),
        ("evaluate", fit_end, export_start),
        ("export_savedmodel", export_start, ev.get("export_savedmodel_end")),
        ("export_keras", ev.get("save_keras_start"), ev.get("save_keras_end")),
        ("export_check", ev.get("export_check_start"), ev.get("export_check_end")),
        ("write", ev.get("export_check_end") or ev.get("save_keras_end"), ev["main_end"]),
    ]
    out: dict[str, dict] = {}
    for name, a, b in bounds:
        if a and b:
            out[name] = {"wall_s": b["t"] - a["t"], "cpu_s": b["cpu"] - a["cpu"]}
    later = list(zip(epochs_begin[1:], epochs_end[1:], strict=True))
    out["later_epochs"] = {"wall_s": sum(b["t"] - a["t"] for a, b in later),
                           "cpu_s": sum(b["cpu"] - a["cpu"] for a, b in later)}
    in_epochs = sum(b["t"] - a["t"] for a, b in zip(epochs_begin, epochs_end, strict=True))
    in_epochs_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(epochs_begin, epochs_end, strict=True))
    out["fit_other"] = {"wall_s": fit_end["t"] - fit_start["t"] - in_epochs,
                        "cpu_s": fit_end["cpu"] - fit_start["cpu"] - in_epochs_cpu}
    out["startup"] = {"wall_s": ev["probe_start"]["t"] - spawned_at, "cpu_s": None}
    out["exit"] = {"wall_s": exited_at - ev["main_end"]["t"], "cpu_s": None}
    # Upload time inside the epochs (checkpoint + TensorBoard sync after each epoch).
    sync = 0.0
    for s in (e for e in events if e["name"] == "upload_start"):
        end = _first(events, "upload_end", s["t"])
        if end and any(a["t"] <= s["t"] <= b["t"] for a, b in zip(epochs_begin, epochs_end, strict=True)):
            sync += end["t"] - s["t"]
    first_step = _first(events, "first_step_end", epochs_begin[0]["t"])
    val_b = _first(events, "validation_begin", epochs_begin[0]["t"])
    val_e = _first(events, "validation_end", epochs_begin[0]["t"])
    epoch_walls = [b["t"] - a["t"] for a, b in zip(epochs_begin, epochs_end, strict=True)]
    epoch_cpus = [b["cpu"] - a["cpu"] for a, b in zip(epochs_begin, epochs_end, strict=True)]
    return {
        "phases": {k: out[k] for k in PHASES if k in out},
        "epochs": len(epochs_begin),
        "epoch_wall_s": epoch_walls,
        "epoch_cpu_s": epoch_cpus,
        "first_step_s": first_step["t"] - epochs_begin[0]["t"] if first_step else None,
        "first_validation_s": val_e["t"] - val_b["t"] if val_b and val_e else None,
        "checkpoint_sync_s": sync,
        "steady_epoch_s": statistics.fmean(epoch_walls[1:]) if len(epoch_walls) > 1 else None,
        "steady_epoch_cpu_s": statistics.fmean(epoch_cpus[1:]) if len(epoch_cpus) > 1 else None,
    }


# --- one trainer process ------------------------------------------------------------------------------


def run_trainer(include_dir: str, args: list[str], env_extra: dict[str, str], work: Path) -> dict:
    """One probed trainer process; its phases, totals, accuracy and the load around it."""
    probe_out = work / f"probe-{uuid.uuid4().hex[:8]}.json"
    env = benchlib.child_env(env_extra)
    for name in ("TF_CONFIG", "CLUSTER_SPEC"):  # one replica, whatever the caller's environment
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([include_dir] + [p for p in env["PYTHONPATH"].split(os.pathsep)
                                                          if not p.endswith("include")])
    cmd = [sys.executable, str(benchlib.BENCH_DIR / "trainer_probe.py"), str(probe_out), *args]
    load_before = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    spawned = time.time()
    proc = subprocess.run(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", timeout=TIMEOUT_S)
    exited = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode != 0 or not probe_out.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise RuntimeError(f"trainer exited with {proc.returncode}:\n{tail}")
    probe = json.loads(probe_out.read_text())
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    res = phases_from_events(probe["events"], spawned, exited)
    known = sum(p["cpu_s"] for p in res["phases"].values() if p["cpu_s"] is not None)
    res.update(
        wall_s=exited - spawned,
        cpu_s=cpu_total,
        cpu_outside_phases_s=max(0.0, cpu_total - known),  # interpreter start-up and shutdown
        accuracy=summary.get("accuracy"),
        load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    res["steady_training_s"] = res["steady_epoch_s"] * res["epochs"] if res["steady_epoch_s"] else None
    return res


# --- data -----------------------------------------------------------------------------------------------


class GcsEmulator:
    """An in-memory gcp-storage-emulator for the benchmark's gs:// paths."""

    def __init__(self):
        exe = Path(sys.executable).parent / "gcp-storage-emulator"
        self.port = benchlib.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gcs-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(exe) if exe.exists() else "gcp-storage-emulator", "start", "--host",
                                      "127.0.0.1", "--port", str(self.port), "--in-memory"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not benchlib.port_in_use(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gcp-storage-emulator did not start: {Path(self.log.name).read_text()[-500:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


def stage_data(data_dir: str, emulator: GcsEmulator | None, work: Path) -> tuple[str, str]:
    """(split_uri, root for the model/checkpoint dirs): the split the local platform stages."""
    benchlib.setup_paths()
    from dual_deploy.config import load_config
    from dualml import dataset, storage

    if emulator is None:
        root, data_uri = str(work / "out"), data_dir
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        gcs.Client(project="local-project", credentials=AnonymousCredentials()).create_bucket("bench")
        data_uri = "gs://bench/datasets/flowers"
        storage.upload_dir(data_dir, data_uri)
        root = "gs://bench/runs"
    cfg = load_config(platform="local")
    manifest = dataset.stratified_split(dataset.list_image_folder(data_uri), val_fraction=cfg.data.val_fraction,
                                        test_fraction=cfg.data.test_fraction, seed=cfg.data.seed, data_root=data_uri)
    split_uri = storage.join(root, "split.json")
    storage.write_text(split_uri, manifest.to_json())
    return split_uri, root


def local_targets(only: set[str] | None) -> list[tuple[str, list[str]]]:
    """(architecture, trainer args without data/model dirs) of the local platform's targets."""
    benchlib.setup_paths()
    from dual_deploy.config import load_config

    cfg = load_config(platform="local")
    return [(t.architecture, [f"--architecture={t.architecture}", *t.training.trainer_args()])
            for t in cfg.targets if not only or t.architecture in only]


def baseline_tree(ref: str, work: Path) -> tuple[str, str]:
    """``include/`` of commit ``ref`` extracted under ``work``; (its path, the full commit id)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=benchlib.ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = work / f"baseline-{sha[:10]}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", sha, "include"], cwd=benchlib.ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest / "include"), sha


# --- summary ---------------------------------------------------------------------------------------------


def _median_phases(runs: list[dict]) -> dict:
    out = {}
    for name in PHASES:
        walls = [r["phases"][name]["wall_s"] for r in runs if name in r["phases"]]
        cpus = [r["phases"][name]["cpu_s"] for r in runs if r["phases"].get(name, {}).get("cpu_s") is not None]
        if walls:
            out[name] = {"wall_s": round(statistics.median(walls), 2),
                         "cpu_s": round(statistics.median(cpus), 2) if cpus else None}
    return out


def summarize(runs: list[dict]) -> dict:
    med = lambda key: round(statistics.median(r[key] for r in runs), 2) if all(  # noqa: E731
        r.get(key) is not None for r in runs) else None
    return {
        "runs": len(runs),
        "wall_s": med("wall_s"),
        "cpu_s": med("cpu_s"),
        "steady_training_s": med("steady_training_s"),
        "steady_epoch_s": med("steady_epoch_s"),
        "first_step_s": med("first_step_s"),
        "checkpoint_sync_s": med("checkpoint_sync_s"),
        "overhead_s": round(statistics.median(r["wall_s"] - r["steady_training_s"] for r in runs), 2),
        "accuracy": [r["accuracy"] for r in runs],
        "load_average_1m": [r["load_average_1m"] for r in runs],
        "phases": _median_phases(runs),
    }


def run(data_dir: str | None = None, rounds: int = 1, baseline_ref: str | None = None, use_gcs: bool = True,
        only: set[str] | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    emulator = None
    try:
        data_dir = benchlib.ensure_sample_data(data_dir or work / "flowers")
        emulator = GcsEmulator() if use_gcs else None
        split_uri, root = stage_data(data_dir, emulator, work)
        variants = {"current": str(benchlib.ROOT / "include")}
        baseline_sha = None
        if baseline_ref:
            variants["baseline"], baseline_sha = baseline_tree(baseline_ref, work)
        env = {"STORAGE_EMULATOR_HOST": emulator.url} if emulator else {}
        runs: dict[str, dict[str, list]] = {}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for arch, args in local_targets(only):
                for variant in order:
                    job = f"{root}/{variant}-{arch}-{r}"
                    job_env = {**env, "AIP_MODEL_DIR": f"{job}/model/", "AIP_CHECKPOINT_DIR": f"{job}/checkpoints/",
                               "AIP_TENSORBOARD_LOG_DIR": f"{job}/logs/"}
                    cache = work / f"cache-{variant}-{arch}-{r}"  # a cold download cache, as on a fresh machine
                    benchlib.log(f"trainer_profile: round {r + 1}/{rounds} {arch} {variant}")
                    res = run_trainer(variants[variant], [*args, f"--split-uri={split_uri}", f"--cache-dir={cache}"],
                                      job_env, work)
                    shutil.rmtree(cache, ignore_errors=True)
                    runs.setdefault(arch, {}).setdefault(variant, []).append(res)
                    p = res["phases"]
                    benchlib.log(
                        f"trainer_profile: {arch} {variant}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU "
                        f"(first epoch {p['first_epoch']['wall_s']:.1f} s, steady epoch {res['steady_epoch_s']:.1f} s, "
                        f"export {p['export_savedmodel']['wall_s']:.1f} s), accuracy {res['accuracy']:.3f}, "
                        f"load {res['load_average_1m']}")
    finally:
        if emulator:
            emulator.stop()
        shutil.rmtree(work, ignore_errors=True)
    models = []
    for arch, by_variant in runs.items():
        entry = {"architecture": arch, "args": dict(local_targets({arch}))[arch],
                 **{v: {**summarize(rs), "raw": rs} for v, rs in by_variant.items()}}
        cur, base = entry["current"], entry.get("baseline")
        entry["overhead_ratio"] = benchlib.ratio(cur["wall_s"], cur["steady_training_s"])
        if base:
            entry["ratio_wall_vs_baseline"] = benchlib.ratio(cur["wall_s"], base["wall_s"])
            entry["ratio_cpu_vs_baseline"] = benchlib.ratio(cur["cpu_s"], base["cpu_s"])
        models.append(entry)
    return {
        "method": "python -m dualml.trainer (via bench/trainer_probe.py) with the local platform's args; medians "
                  "of rounds; baseline and current alternated within each round",
        "storage": "gs:// (GCS emulator, in memory)" if use_gcs else "local folders",
        "data": "dualml.sample_data (5 classes, 60 per class, 128 px JPEG), local split",
        "baseline_ref": baseline_ref,
        "baseline_commit": baseline_sha,
        "rounds": rounds,
        "models": models,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: generate the sample data in a temp dir)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline-ref", help="also profile the trainer of this commit (e.g. HEAD~3), alternating")
    p.add_argument("--local", action="store_true", help="local folders instead of gs:// on a GCS emulator")
    p.add_argument("--only", help="comma-separated architectures (default: every local target)")
    p.add_argument("--quick", action="store_true", help="1 round")
    p.add_argument("--out")
    a = p.parse_args(argv)
    only = {x.strip() for x in a.only.split(",")} if a.only else None
    res = run(a.data, rounds=1 if a.quick else a.rounds, baseline_ref=a.baseline_ref, use_gcs=not a.local, only=only)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
