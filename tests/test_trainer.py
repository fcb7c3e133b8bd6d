"""dualml.trainer: configuration (CLI + Vertex env contract), strategy choice, metrics, and
end-to-end runs of the real entrypoint on tiny synthetic data (marked slow).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from dualml import dataset, sample_data, storage
from dualml.trainer import distribute, evaluate
from dualml.trainer.config import ConfigError, TrainConfig, parse_args

# Keras 3.15 on numpy 2 warns from inside fit()/save(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

INCLUDE = Path(__file__).resolve().parents[1] / "include"
VERTEX_ENV = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "TF_CONFIG", "CLUSTER_SPEC")
BASE_ARGS = ["--architecture", "mobilenet_v3_small", "--data-uri", "/data/flowers"]


@pytest.fixture
def no_vertex_env(monkeypatch):
    for name in VERTEX_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ================================================================ config


def test_flags_override_the_vertex_environment(no_vertex_env):
    no_vertex_env.setenv("AIP_MODEL_DIR", "gs://b/job/model/")
    no_vertex_env.setenv("AIP_CHECKPOINT_DIR", "gs://b/job/checkpoints/")
    no_vertex_env.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://b/job/logs/")
    cfg = parse_args(BASE_ARGS + ["--model-dir", "/m", "--checkpoint-dir", "/c", "--tensorboard-dir", "/t"])
    assert (cfg.model_dir, cfg.checkpoint_dir, cfg.tensorboard_dir) == ("/m", "/c", "/t")


def test_vertex_environment_is_used_without_flags(no_vertex_env):
    no_vertex_env.setenv("AIP_MODEL_DIR", "gs://b/job/model/")
    no_vertex_env.setenv("AIP_CHECKPOINT_DIR", "gs://b/job/checkpoints/")
    no_vertex_env.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://b/job/logs/")
    cfg = parse_args(BASE_ARGS)
    assert cfg.model_dir == "gs://b/job/model/"
    assert cfg.checkpoint_dir == "gs://b/job/checkpoints/"
    assert cfg.tensorboard_dir == "gs://b/job/logs/"


def test_defaults_without_environment(no_vertex_env):
    cfg = parse_args(BASE_ARGS + ["--model-dir", "/m"])
    assert cfg.checkpoint_dir is None and cfg.tensorboard_dir is None
    assert cfg.weights == "imagenet" and cfg.pretrained
    assert (cfg.image_size, cfg.batch_size, cfg.epochs, cfg.seed) == (224, 32, 10, 42)
    assert cfg.augment is True and cfg.data_format == "auto" and cfg.split_uri is None
    assert json.loads(cfg.to_json()) == asdict(cfg)


def test_no_model_dir_anywhere_is_a_config_error(no_vertex_env):
    with pytest.raises(ConfigError, match="--model-dir or set AIP_MODEL_DIR"):
        parse_args(BASE_ARGS)


def test_split_uri_alone_is_enough_data(no_vertex_env):
    cfg = parse_args(
        ["--architecture", "densenet121", "--split-uri", "gs://b/split.json", "--model-dir", "/m"]
    )
    assert cfg.data_uri == "" and cfg.split_uri == "gs://b/split.json"
    with pytest.raises(ConfigError, match="--data-uri"):
        parse_args(["--architecture", "densenet121", "--model-dir", "/m"])


@pytest.mark.parametrize(
    "value, expected",
    [
        ("none", None),
        ("None", None),
        ("NULL", None),
        ("", None),
        ("imagenet", "imagenet"),
        ("/w/backbone.h5", "/w/backbone.h5"),
    ],
)
def test_weights_flag(no_vertex_env, value, expected):
    cfg = parse_args(BASE_ARGS + ["--model-dir", "/m", "--weights", value])
    assert cfg.weights == expected
    assert cfg.pretrained is (expected is not None)


@pytest.mark.parametrize("value, expected", [("true", True), ("0", False), ("No", False), ("on", True)])
def test_augment_flag(no_vertex_env, value, expected):
    assert parse_args(BASE_ARGS + ["--model-dir", "/m", "--augment", value]).augment is expected


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--image-size", "16"),
        ("--image-size", "2048"),
        ("--batch-size", "0"),
        ("--epochs", "0"),
        ("--fine-tune-epochs", "-1"),
        ("--dropout", "1.0"),
        ("--dropout", "-0.1"),
        ("--learning-rate", "0"),
        ("--fine-tune-learning-rate", "-0.5"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_flag(no_vertex_env, flag, value):
    with pytest.raises(ConfigError) as e:
        parse_args(BASE_ARGS + ["--model-dir", "/m", f"{flag}={value}"])  # "=": "-1" is a value, not a flag
    assert str(e.value).startswith(f"{flag} ")
    assert value in str(e.value)


@pytest.mark.parametrize(
    "field, value, flag",
    [("architecture", "resnet50", "--architecture"), ("data_format", "csv", "--data-format")],
)
def test_invalid_choice_in_a_built_config(field, value, flag):
    cfg = TrainConfig(architecture="densenet121", data_uri="/d", model_dir="/m")
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=flag):
        cfg.validate()


@pytest.mark.parametrize(
    "argv",
    [["--architecture", "resnet50"], ["--data-format", "csv"], ["--augment", "maybe"], ["--epochs", "two"]],
)
def test_argparse_rejects_unparseable_flags(no_vertex_env, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE_ARGS + ["--model-dir", "/m"] + argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_main_returns_2_on_config_error(no_vertex_env, caplog):
    from dualml.trainer import task

    with caplog.at_level(logging.ERROR, logger="dualml.trainer"):
        assert task.main(BASE_ARGS + ["--model-dir", "/m", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in caplog.text


# ================================================================ distribute

CLUSTER = {
    "chief": ["cmle-training-workerpool0:2222"],
    "worker": ["cmle-training-workerpool1-0:2222", "cmle-training-workerpool1-1:2222"],
}
WORKERS_ONLY = {"worker": ["w0:2222", "w1:2222", "w2:2222"]}


def _tf_config(cluster, task_type, index):
    # The shape Vertex AI sets for multi-replica jobs.
    return {
        "cluster": cluster,
        "task": {"type": task_type, "index": index, "trial": ""},
        "environment": "cloud",
        "job": {"worker_pool_specs": []},
    }


@pytest.mark.parametrize(
    "tf_config, gpus, kind, chief",
    [
        ({}, 0, "default", True),
        ({}, 1, "one_device_gpu", True),
        ({}, 2, "mirrored", True),
        ({}, 8, "mirrored", True),
        # One replica: Vertex still sets a TF_CONFIG with a lone chief.
        (_tf_config({"chief": ["c:2222"]}, "chief", 0), 1, "one_device_gpu", True),
        (_tf_config(CLUSTER, "chief", 0), 0, "multi_worker_mirrored", True),
        (_tf_config(CLUSTER, "chief", 0), 4, "multi_worker_mirrored", True),
        (_tf_config(CLUSTER, "worker", 0), 1, "multi_worker_mirrored", False),  # a chief exists
        (_tf_config(CLUSTER, "worker", 1), 1, "multi_worker_mirrored", False),
        (_tf_config(WORKERS_ONLY, "worker", 0), 0, "multi_worker_mirrored", True),  # no chief: worker 0 is
        (_tf_config(WORKERS_ONLY, "worker", 1), 0, "multi_worker_mirrored", False),
        (_tf_config(CLUSTER, "evaluator", 0), 0, "multi_worker_mirrored", False),
    ],
)
def test_strategy_kind_and_chief(tf_config, gpus, kind, chief):
    env = {"TF_CONFIG": json.dumps(tf_config)} if tf_config else {}
    parsed = distribute.read_tf_config(env)
    assert parsed == tf_config
    assert distribute.strategy_kind(parsed, gpus) == kind
    assert distribute.is_chief(parsed) is chief


def test_read_tf_config_blank_and_counts():
    assert distribute.read_tf_config({}) == {}
    assert distribute.read_tf_config({"TF_CONFIG": "  "}) == {}
    assert distribute.num_workers(_tf_config(CLUSTER, "chief", 0)) == 3
    assert distribute.num_workers(_tf_config(WORKERS_ONLY, "worker", 0)) == 3
    assert distribute.num_workers({}) == 0


def test_default_strategy_has_one_replica():
    assert distribute.make_strategy("default").num_replicas_in_sync == 1


# ================================================================ evaluate


def test_classification_metrics_hand_computed():
    labels = ["a", "b", "c", "d"]
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = evaluate.classification_metrics(y_true, y_pred, labels)
    assert m["confusion_matrix"] == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]
    assert m["num_examples"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    # a: 2 of 2 predicted a are right; 2 of 3 a found.  F1 = 2*1*(2/3)/(5/3) = 0.8
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    # Never true, never predicted: zeros, not a division error.
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0.0) / 4)
    assert m["labels"] == labels
    json.dumps(m)  # plain Python types: written as metrics.json


def test_classification_metrics_perfect_and_empty():
    m = evaluate.classification_metrics(np.array([1, 0, 1]), np.array([1, 0, 1]), ["x", "y"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["confusion_matrix"] == [[1, 0], [0, 2]]
    empty = evaluate.classification_metrics([], [], ["x", "y"])
    assert empty["accuracy"] == 0.0 and empty["num_examples"] == 0
    assert empty["confusion_matrix"] == [[0, 0], [0, 0]]


# ================================================================ models (build only)


def test_models_take_0_255_rgb_and_output_probabilities():
    from dualml.trainer.models import build_classifier, set_backbone_trainable

    model, backbone = build_classifier("mobilenet_v3_small", 3, 32, weights=None, bn_momentum=0.9)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    p = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32"), verbose=0)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    bns = [la for la in backbone.layers if la.__class__.__name__ == "BatchNormalization"]
    assert bns and all(la.momentum == 0.9 for la in bns)
    set_backbone_trainable(backbone, trainable=True, fine_tune_at=10)
    assert not any(la.trainable for la in backbone.layers[:10])
    assert not any(la.trainable for la in bns)  # pretrained fine-tuning keeps BN frozen
    set_backbone_trainable(backbone, trainable=True, freeze_batchnorm=False)
    assert all(la.trainable for la in bns)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("mobilenet_v3_small", 1, 32, weights=None)


def test_densenet_normalises_inside_the_model():
    from dualml.trainer.models import build_classifier

    model, _ = build_classifier("densenet121", 5, 32, weights=None)
    assert model.output_shape == (None, 5)
    names = [la.name for la in model.layers]
    assert names[1:3] == ["scale", "imagenet_norm"]
    x = np.full((1, 32, 32, 3), 255.0, dtype="float32")
    import keras

    norm = keras.Model(model.input, model.get_layer("imagenet_norm").output)(x).numpy()
    # densenet.preprocess_input ("torch" mode) on white pixels: (1 - mean) / std per channel.
    expected = keras.applications.densenet.preprocess_input(x.copy())
    assert np.allclose(norm, expected, atol=1e-4)


# ================================================================ data pipeline


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    """5 classes x 12 images at 48 px: a 40/10/10 split with the default fractions."""
    root = tmp_path_factory.mktemp("flowers")
    sample_data.generate(root, per_class=12, size=48)
    return root


@pytest.fixture(scope="module")
def manifest(flowers) -> dataset.SplitManifest:
    files, _ = dataset.validate(dataset.list_image_folder(str(flowers)))
    m = dataset.stratified_split(files, seed=42, data_root=str(flowers))
    assert m.counts() == {"train": 40, "val": 10, "test": 10}
    return m


def test_tfrecords_hold_the_same_examples_as_the_images(manifest, tmp_path):
    from dualml.trainer import data_pipeline as dp

    written = dp.write_tfrecords(manifest, str(tmp_path), num_shards=3)
    assert {s: len(v) for s, v in written.items()} == {"train": 3, "val": 3, "test": 3}
    assert written["test"][0].endswith("test-00000-of-00003.tfrecord")
    assert dataset.parse_labels((tmp_path / "labels.txt").read_text()) == manifest.labels
    shards = dp.tfrecord_shards(str(tmp_path))
    assert shards == {s: sorted(v) for s, v in written.items()}

    from_images = dp.image_dataset(manifest.files["test"], 40, 4, training=False)
    from_records = dp.tfrecord_dataset(shards["test"], 40, 4, training=False)

    def collect(ds):
        xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in ds), strict=True)
        return np.concatenate(xs), np.concatenate(ys)

    xi, yi = collect(from_images)
    xr, yr = collect(from_records)
    assert xi.shape == xr.shape == (10, 40, 40, 3) and xi.dtype == np.float32
    assert 0 <= xi.min() and xi.max() <= 255
    assert list(yi) == [i for _, i in manifest.files["test"]]
    # Shards interleave the examples: compare as (label, image) pairs regardless of order.
    key = lambda x, y: sorted((int(label), img.tobytes()) for img, label in zip(x, y, strict=True))  # noqa: E731
    assert key(xi, yi) == key(xr, yr)


def test_training_pipeline_is_one_pass_per_epoch_reproducible_and_augmented(manifest):
    """repeat=True + steps_per_epoch: every epoch is one shuffled pass (last batch partial), the
    augmented batches are the same for the same seed and differ between epochs."""
    import keras

    from dualml.trainer import data_pipeline as dp

    files = manifest.files["train"]  # 40 images
    steps = dp.steps_per_epoch(len(files), 16)
    assert steps == 3

    def two_epochs(augment=True, seed=42):
        keras.utils.set_random_seed(0)
        it = iter(dp.image_dataset(files, 40, 16, training=True, augment=augment, seed=seed, repeat=True))
        return [tuple(t.numpy() for t in next(it)) for _ in range(2 * steps)]

    a, b = two_epochs(), two_epochs()
    assert [len(y) for _, y in a] == [16, 16, 8] * 2
    for epoch in (a[:steps], a[steps:]):  # each image exactly once per epoch
        assert sorted(np.concatenate([y for _, y in epoch]).tolist()) == sorted(i for _, i in files)
    assert all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not np.array_equal(a[0][0], a[steps][0])  # reshuffled and re-augmented
    x = np.concatenate([x for x, _ in a])
    assert x.dtype == np.float32 and x.shape[1:] == (40, 40, 3) and 0 <= x.min() and x.max() <= 255

    # Augmentation changes the images (not the labels), differently per image and per seed.
    plain = two_epochs(augment=False)
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in a]
    diff = np.abs(a[0][0] - plain[0][0]).reshape(16, -1).mean(axis=1)
    assert (diff > 0.5).all() and len(np.unique(diff.round(3))) > 8
    assert not np.array_equal(two_epochs(seed=7)[0][0], a[0][0])
    # Evaluation batches: no augmentation, manifest order, one finite pass.
    ev = [y for _, y in dp.image_dataset(files, 40, 16, training=False)]
    assert np.concatenate(ev).tolist() == [i for _, i in files]


def test_train_step_is_traced_once_and_inference_once(manifest, tmp_path):
    """compile_classifier creates the optimizer and metric variables up front, so fit traces the
    train step once (not twice); evaluation and the serving export share one inference trace."""
    import keras
    import tensorflow as tf

    from dualml.preprocess import load_image
    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.evaluate import predict_batches
    from dualml.trainer.export import export_serving_model, inference_fn, load_serving_fn
    from dualml.trainer.models import build_classifier, compile_classifier

    model, _ = build_classifier("mobilenet_v3_small", 5, 32, weights=None, bn_momentum=0.9)
    compile_classifier(model, 1e-3)
    traces = []
    train_step = model.train_step
    model.train_step = lambda data: traces.append(1) or train_step(data)
    train = dp.image_dataset(manifest.files["train"], 32, 16, training=True, repeat=True)
    val = dp.image_dataset(manifest.files["val"], 32, 16, training=False)
    hist = model.fit(train, validation_data=val, epochs=2, steps_per_epoch=3, verbose=0, shuffle=False)
    assert len(traces) == 1
    assert len(hist.history["loss"]) == 2 and "val_accuracy" in hist.history

    infer = inference_fn(model, 32)
    y, probs = predict_batches(infer, dp.image_dataset(manifest.files["test"], 32, 4, training=False))
    assert probs.shape == (10, 5) and y.tolist() == [i for _, i in manifest.files["test"]]  # 4+4+2: one trace
    export_serving_model(model, manifest.labels, 32, str(tmp_path / "export"), infer=infer)
    assert infer.experimental_get_tracing_count() == 1
    raw = [Path(u).read_bytes() for u, _ in manifest.files["test"]]
    served = load_serving_fn(str(tmp_path / "export"))(image_bytes=tf.constant(raw))
    np.testing.assert_allclose(served["probabilities"].numpy(), probs, atol=1e-5)
    expected = model.predict(np.stack([load_image(b, 32) for b in raw]), verbose=0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert dataset.parse_labels((tmp_path / "export" / "labels.txt").read_text()) == manifest.labels

    keras.saving.save_model(model, tmp_path / "model.keras")
    m = evaluate.evaluate_keras_model(str(tmp_path / "model.keras"), manifest.files["test"], manifest.labels,
                                      batch_size=4)
    assert m == evaluate.classification_metrics(y, probs.argmax(axis=-1), manifest.labels)


def test_tfrecord_dir_without_a_split_is_a_dataset_error(tmp_path):
    from dualml.trainer import data_pipeline as dp

    (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(dataset.DatasetError, match="no shards for split.*val, test"):
        dp.tfrecord_shards(str(tmp_path))


# ================================================================ end to end (slow)


def _gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="local-project", credentials=AnonymousCredentials())


def _run_trainer(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m dualml.trainer`` as Vertex runs it: arguments on the command line, dirs in env."""
    full_env = {k: v for k, v in os.environ.items() if k not in VERTEX_ENV}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INCLUDE), os.environ.get("PYTHONPATH")]))
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(
        [sys.executable, "-m", "dualml.trainer", *args],
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=480,
    )


TINY = [
    "--architecture",
    "mobilenet_v3_small",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--weights",
    "none",
]
MODEL_FILES = {
    "saved_model.pb",
    "variables",
    "model.keras",
    "labels.txt",
    "metrics.json",
    "history.json",
    "split.json",
    "training_config.json",
}


@pytest.mark.slow
def test_vertex_contract_end_to_end_on_gcs(gcs_emulator, flowers, tmp_path):
    """Data, model, checkpoints and TensorBoard logs all on gs:// (emulator), dirs only from AIP_* env."""
    import keras
    import tensorflow as tf

    from dualml.preprocess import load_image
    from dualml.trainer.export import load_serving_fn

    bucket = f"trainer-{uuid.uuid4().hex[:10]}"
    _gcs_client().create_bucket(bucket)
    data_uri = f"gs://{bucket}/data/flowers"
    storage.upload_dir(str(flowers), data_uri)
    storage.write_text(f"{data_uri}/README.txt", "stray file: not a class")
    job = f"gs://{bucket}/vertex/job-1"
    env = {
        "AIP_MODEL_DIR": f"{job}/model/",  # Vertex passes them with a trailing slash
        "AIP_CHECKPOINT_DIR": f"{job}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{job}/logs/",
    }
    proc = _run_trainer(
        TINY + ["--data-uri", data_uri, "--epochs", "2", "--cache-dir", str(tmp_path / "cache")],
        env,
        tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["model_dir"] == env["AIP_MODEL_DIR"]

    # --- what the chief published
    listed = storage.list_files(env["AIP_MODEL_DIR"])
    top = {u[len(job) + len("/model/") :].split("/")[0] for u in listed}
    assert MODEL_FILES <= top, top
    assert top <= MODEL_FILES | {"fingerprint.pb", "assets"}  # no scratch (checkpoints, logs) leaked in
    assert storage.list_files(env["AIP_CHECKPOINT_DIR"]), "no checkpoints were synced"
    tb = storage.list_files(env["AIP_TENSORBOARD_LOG_DIR"])
    assert any("tfevents" in u for u in tb), tb

    local = Path(storage.download_dir(env["AIP_MODEL_DIR"], str(tmp_path / "model")))
    assert (local / "variables" / "variables.index").exists()
    labels = dataset.parse_labels((local / "labels.txt").read_text())
    assert labels == sorted(sample_data.CLASSES)

    split = dataset.SplitManifest.from_json((local / "split.json").read_text())
    assert split.labels == labels
    assert split.data_root == data_uri
    assert split.counts() == {"train": 40, "val": 10, "test": 10}
    assert all(u.startswith(data_uri + "/") and "README" not in u for s in split.files.values() for u, _ in s)

    metrics = json.loads((local / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["labels"] == labels
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == metrics["num_examples"] == 10
    assert list(cm.sum(axis=1)) == [2] * 5  # each class's test images, as in split.json
    assert metrics["split_fingerprint"] == split.fingerprint()
    assert metrics["export_check"]["max_abs_diff"] <= 1e-4

    history = json.loads((local / "history.json").read_text())
    assert len(history["loss"]) == len(history["val_loss"]) == len(history["phase"]) == 2
    assert history["phase"] == ["train", "train"]

    tc = json.loads((local / "training_config.json").read_text())
    assert tc["config"]["model_dir"] == env["AIP_MODEL_DIR"]
    assert tc["config"]["checkpoint_dir"] == env["AIP_CHECKPOINT_DIR"]
    assert tc["config"]["tensorboard_dir"] == env["AIP_TENSORBOARD_LOG_DIR"]
    assert tc["config"]["weights"] is None and tc["config"]["image_size"] == 32
    assert (tc["strategy"], tc["replicas"]) == ("default", 1)

    # --- the two exported forms agree on the test split, and with metrics.json
    raw = [storage.read_bytes(u) for u, _ in split.files["test"]]
    served = load_serving_fn(str(local))(image_bytes=tf.constant(raw))
    model = keras.saving.load_model(str(local / "model.keras"))
    expected = model.predict(np.stack([load_image(b, 32) for b in raw]), verbose=0)
    probs = served["probabilities"].numpy()
    assert probs.shape == (10, 5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    top1 = probs.argmax(axis=1)
    assert [s.decode() for s in served["label"].numpy()] == [labels[i] for i in top1]
    assert list(served["class_index"].numpy()) == list(top1)
    np.testing.assert_allclose(served["confidence"].numpy(), probs.max(axis=1), atol=1e-6)
    recomputed = evaluate.classification_metrics([i for _, i in split.files["test"]], top1, labels)
    assert recomputed["confusion_matrix"] == metrics["confusion_matrix"]

    # Any image size / PNG works through the serving signature (resize is inside).
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(raw[0])).resize((80, 60)).save(buf, format="PNG")
    odd = load_serving_fn(str(local))(image_bytes=tf.constant([buf.getvalue()]))
    assert odd["probabilities"].shape == (1, 5)


@pytest.mark.slow
def test_train_from_tfrecords_in_process(manifest, tmp_path, no_vertex_env):
    from dualml.trainer import data_pipeline as dp
    from dualml.trainer import task

    tfr = tmp_path / "tfrecords"
    dp.write_tfrecords(manifest, str(tfr), num_shards=2)
    model_dir = tmp_path / "model"
    cfg = TrainConfig(
        architecture="mobilenet_v3_small",
        data_uri=str(tfr),
        model_dir=str(model_dir),
        data_format="auto",  # detected from the .tfrecord files
        image_size=32,
        batch_size=8,
        epochs=1,
        weights=None,
    ).validate()
    result = task.run(cfg)

    assert result["labels"] == manifest.labels
    m = result["metrics"]
    assert m["labels"] == manifest.labels
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["num_examples"] == 10  # every test record read exactly once
    assert np.array(m["confusion_matrix"]).shape == (5, 5)
    test_support = {lab: 0 for lab in manifest.labels}
    for _, i in manifest.files["test"]:
        test_support[manifest.labels[i]] += 1
    assert {c: v["support"] for c, v in m["per_class"].items()} == test_support
    assert m["export_check"] is None  # no manifest to check the export against in TFRecord mode
    assert dataset.parse_labels((model_dir / "labels.txt").read_text()) == manifest.labels
    assert (model_dir / "saved_model.pb").exists() and (model_dir / "model.keras").exists()
    assert json.loads((model_dir / "metrics.json").read_text())["confusion_matrix"] == m["confusion_matrix"]
    assert json.loads((model_dir / "history.json").read_text())["phase"] == ["train"]
    assert not (model_dir / "split.json").exists()


@pytest.mark.slow
def test_bad_data_fails_with_the_dataset_error_and_publishes_nothing(tmp_path):
    data = tmp_path / "one_class"
    sample_data.generate(data, per_class=5, size=32, classes=("daisy",))
    model_dir = tmp_path / "model"
    env = {"AIP_MODEL_DIR": str(model_dir), "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    proc = _run_trainer(TINY + ["--data-uri", str(data), "--epochs", "1"], env, tmp_path)
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "found 1 class folder(s) with images (daisy); need at least 2" in proc.stdout
    assert not model_dir.exists() or not any(model_dir.iterdir())
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


@pytest.mark.slow
def test_deterministic_training_gives_the_same_model_twice(manifest, tmp_path, no_vertex_env):
    """--deterministic=true: the same data and seed give the same weights and metrics (the champion
    gate relies on a re-run tying with its champion)."""
    import keras

    from dualml.trainer import task

    split = tmp_path / "split.json"
    split.write_text(manifest.to_json())
    results = []
    for k in range(2):
        cfg = TrainConfig(architecture="mobilenet_v3_small", data_uri="", split_uri=str(split),
                          model_dir=str(tmp_path / f"model{k}"), image_size=32, batch_size=8, epochs=2,
                          weights=None, deterministic=True).validate()
        results.append(task.run(cfg))
    m0, m1 = (r["metrics"] for r in results)
    assert m0["confusion_matrix"] == m1["confusion_matrix"] and m0["accuracy"] == m1["accuracy"]
    h0, h1 = (json.loads((tmp_path / f"model{k}" / "history.json").read_text()) for k in range(2))
    assert h0 == h1
    w0, w1 = (keras.saving.load_model(tmp_path / f"model{k}" / "model.keras").get_weights() for k in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(w0, w1, strict=True))
    phases = json.loads((tmp_path / "model0" / "training_config.json").read_text())["timings"]["phases"]
    assert set(phases) == {"data", "build", "train", "evaluate", "export_savedmodel", "export_keras", "export_check"}
    assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in phases.values())


# ================================================================ bench: trainer profile phases


def test_trainer_profile_phases_from_probe_events():
    """bench/trainer_profile.py turns trainer_probe.py's events into phases that add up."""
    sys.path.insert(0, str(INCLUDE.parent / "bench"))
    try:
        import trainer_profile
    finally:
        sys.path.remove(str(INCLUDE.parent / "bench"))
    t = 1000.0
    names = [("probe_start", 0), ("imports_end", 10), ("run_start", 10.5), ("build_start", 12), ("fit_start", 14),
             ("epoch_begin", 14.5), ("first_step_end", 30), ("validation_begin", 33), ("validation_end", 35),
             ("epoch_end", 36), ("epoch_begin", 36), ("upload_start", 38), ("upload_end", 39), ("epoch_end", 40),
             ("epoch_begin", 40), ("epoch_end", 43), ("fit_end", 44), ("export_savedmodel_start", 46),
             ("export_savedmodel_end", 50), ("save_keras_start", 50), ("save_keras_end", 51),
             ("export_check_start", 51), ("export_check_end", 53), ("upload_start", 53), ("upload_end", 54),
             ("main_end", 55)]
    events = [{"name": n, "t": t + dt, "cpu": dt / 2} for n, dt in names]
    res = trainer_profile.phases_from_events(events, spawned_at=t - 1, exited_at=t + 57)
    ph = {k: v["wall_s"] for k, v in res["phases"].items()}
    assert ph == pytest.approx({"startup": 1, "import": 10, "data": 2, "build": 2, "first_epoch": 21.5,
                                "later_epochs": 7, "fit_other": 1.5, "evaluate": 2, "export_savedmodel": 4,
                                "export_keras": 1, "export_check": 2, "write": 2, "exit": 2})
    assert sum(ph.values()) == pytest.approx(58)  # spawn to exit, nothing lost or counted twice
    assert res["phases"]["first_epoch"]["cpu_s"] == pytest.approx(10.75)
    assert res["epochs"] == 3 and res["first_step_s"] == pytest.approx(15.5)
    assert res["first_validation_s"] == pytest.approx(2) and res["checkpoint_sync_s"] == pytest.approx(1)
    assert res["steady_epoch_s"] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="incomplete epoch events"):
        trainer_profile.phases_from_events(events[:15] + events[16:], spawned_at=t - 1, exited_at=t + 57)
    with pytest.raises(ValueError, match="did not reach fit_end, main_end"):
        trainer_profile.phases_from_events(events[:16], spawned_at=t - 1, exited_at=t + 57)
