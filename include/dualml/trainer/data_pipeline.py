"""tf.data input pipelines: image files from a split manifest, or TFRecord shards.

Parallel decode and resize, cache, shuffle (training only), batch, augment whole batches
(training only), prefetch.
gs:// data is first copied to a local cache folder (parallel downloads) so the pipeline
reads local files; that also works against the GCS emulator, which TensorFlow's own gs://
filesystem does not support.
"""

from __future__ import annotations

import math
import os
import tempfile

import tensorflow as tf

from dualml import dataset, storage
from dualml.preprocess import decode_and_resize

AUTOTUNE = tf.data.AUTOTUNE
TFRECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def localize(uris: list[str], cache_dir: str | None = None) -> list[str]:
    """Local paths for ``uris``; gs:// objects are downloaded once into ``cache_dir``.

    The cache is keyed by content (the MD5/CRC32C the listing returns), not by name: images
    replaced under the same name (even at the same size) are fetched again, so training never
    reads bytes other than those now in the bucket (see ``dualml.storage.download_cached``).
    """
    remote = [u for u in uris if storage.is_gcs(u)]
    if not remote:
        return list(uris)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "dualml-data-cache")
    mapping = storage.download_cached(remote, cache_dir, threads=storage.DOWNLOAD_THREADS)
    return [mapping.get(u, u) for u in uris]


def _augment_batch(images, labels, key, seed: int):
    """Label-preserving, cheap augmentation of a whole batch (after the cache, so every epoch
    sees fresh variants): per image a random left-right flip, brightness +-20 and contrast
    x0.85-1.15 around the image's channel means (tf.image.random_* semantics), vectorised
    over the batch. Stateless draws keyed by ``key`` (one per batch from a seeded random
    dataset) are reproducible whatever the map parallelism."""
    n = tf.shape(images)[0]
    u = tf.random.stateless_uniform([3, n, 1, 1, 1], seed=tf.stack([key, tf.constant(seed, tf.int64)]))
    images = tf.where(u[0] < 0.5, tf.reverse(images, axis=[2]), images)
    images = images + (2.0 * u[1] - 1.0) * 20.0
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    images = (images - mean) * (0.85 + 0.3 * u[2]) + mean
    return tf.clip_by_value(images, 0.0, 255.0), labels


def _finish(ds, *, training: bool, batch_size: int, seed: int, augment: bool, n: int, repeat: bool = False):
    """cache -> (shuffle) -> batch -> (repeat) -> (augment) -> prefetch.

    ``repeat`` (training only) keeps one iterator for the whole ``fit``: the caller passes
    ``steps_per_epoch`` (= batches per pass, so epochs keep their boundaries and their last,
    partial batch), and prefetching runs on into the next epoch while validation runs instead
    of restarting an iterator every epoch.
    """
    ds = ds.cache()
    if training:
        ds = ds.shuffle(min(n, 10_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and repeat:
        ds = ds.repeat()
    if training and augment:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, keys)).map(
            lambda xy, key: _augment_batch(xy[0], xy[1], key, seed), num_parallel_calls=AUTOTUNE, deterministic=True
        )
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in one pass over ``num_examples`` (the last one may be partial)."""
    return max(1, math.ceil(num_examples / batch_size))


def image_dataset(
    files: list[tuple[str, int]],
    image_size: int,
    batch_size: int,
    *,
    training: bool,
    seed: int = 42,
    augment: bool = True,
    cache_dir: str | None = None,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Decoded, resized (float32 [0, 255]) batches of ``files``, decoded once and cached in memory.

    ``repeat=True`` (training only): an endless dataset; train with
    ``steps_per_epoch(len(files), batch_size)`` steps per epoch.
    """
    if not files:
        raise dataset.DatasetError("a split is empty: nothing to train or evaluate on")
    paths = localize([u for u, _ in files], cache_dir)
    labels = [i for _, i in files]
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(
        lambda p, y: (decode_and_resize(tf.io.read_file(p), image_size), y),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    return _finish(ds, training=training, batch_size=batch_size, seed=seed, augment=augment, n=len(files),
                   repeat=repeat)


def tfrecord_shards(data_uri: str) -> dict[str, list[str]]:
    """Shards named ``train-*``, ``val-*`` and ``test-*`` (``.tfrecord`` / ``.tfrec``) in ``data_uri``."""
    files = storage.list_files(data_uri)
    out = {s: sorted(f for f in files if os.path.basename(f).startswith(f"{s}-")) for s in dataset.SPLITS}
    missing = [s for s, v in out.items() if not v]
    if missing:
        raise dataset.DatasetError(
            f"TFRecord dir {data_uri} has no shards for split(s) {', '.join(missing)}; "
            "name them train-00000-of-00004.tfrecord, val-..., test-..."
        )
    return out


def parse_example(serialized, image_size: int):
    ex = tf.io.parse_single_example(serialized, TFRECORD_FEATURES)
    return decode_and_resize(ex["image/encoded"], image_size), tf.cast(ex["image/class/label"], tf.int32)


def tfrecord_dataset(shards: list[str], image_size: int, batch_size: int, *, training: bool, seed: int = 42,
                     augment: bool = True, cache_dir: str | None = None) -> tf.data.Dataset:
    local = localize(shards, cache_dir)
    ds = tf.data.TFRecordDataset(local, num_parallel_reads=AUTOTUNE)
    ds = ds.map(lambda s: parse_example(s, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
    return _finish(ds, training=training, batch_size=batch_size, seed=seed, augment=augment, n=10_000)


def write_tfrecords(manifest: dataset.SplitManifest, out_dir: str, num_shards: int = 2) -> dict[str, list[str]]:
    """Write a manifest's images as TFRecord shards (encoded bytes + label) plus labels.txt."""
    written: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, files in manifest.files.items():
            n = max(1, min(num_shards, len(files)))
            names = [f"{split}-{k:05d}-of-{n:05d}.tfrecord" for k in range(n)]
            writers = [tf.io.TFRecordWriter(os.path.join(tmp, name)) for name in names]
            for j, (uri, label) in enumerate(files):
                feature = {
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[storage.read_bytes(uri)])),
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                writers[j % n].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
            for w in writers:
                w.close()
            written[split] = [storage.join(out_dir, name) for name in names]
        with open(os.path.join(tmp, "labels.txt"), "w") as f:
            f.write(dataset.labels_text(manifest.labels))
        storage.upload_dir(tmp, out_dir)
    return written
