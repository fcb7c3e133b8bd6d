"""tf.data input pipelines: image files from a split manifest, or TFRecord shards.

Parallel decode and resize, cache, shuffle and augment (training only), batch, prefetch.
gs:// data is first copied to a local cache folder (parallel downloads) so the pipeline
reads local files; that also works against the GCS emulator, which TensorFlow's own gs://
filesystem does not support.
"""

from __future__ import annotations

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


def _augment(image, label, seed: int):
    # Label-preserving, cheap, applied after the cache so every epoch sees fresh variants.
    image = tf.image.random_flip_left_right(image, seed=seed)
    image = tf.image.random_brightness(image, max_delta=20.0, seed=seed)
    image = tf.image.random_contrast(image, 0.85, 1.15, seed=seed)
    return tf.clip_by_value(image, 0.0, 255.0), label


def _finish(ds, *, training: bool, batch_size: int, seed: int, augment: bool, n: int):
    ds = ds.cache()
    if training:
        ds = ds.shuffle(min(n, 10_000), seed=seed, reshuffle_each_iteration=True)
        if augment:
            ds = ds.map(lambda x, y: _augment(x, y, seed), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size).prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def image_dataset(
    files: list[tuple[str, int]],
    image_size: int,
    batch_size: int,
    *,
    training: bool,
    seed: int = 42,
    augment: bool = True,
    cache_dir: str | None = None,
) -> tf.data.Dataset:
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
    return _finish(ds, training=training, batch_size=batch_size, seed=seed, augment=augment, n=len(files))


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
