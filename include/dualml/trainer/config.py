"""Trainer configuration: CLI arguments plus Vertex AI's environment contract.

Vertex AI custom training passes ``args`` on the command line and sets AIP_MODEL_DIR
(``<base_output_dir>/model/``), AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR and, for
several replicas, TF_CONFIG. Explicit flags win over the environment so the same
entrypoint runs on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from dualml.trainer.models import ARCHITECTURES


class ConfigError(ValueError):
    """A training argument is invalid; the message names it."""


@dataclass
class TrainConfig:
    architecture: str
    data_uri: str
    model_dir: str
    split_uri: str | None = None
    data_format: str = "auto"  # auto | images | tfrecord
    checkpoint_dir: str | None = None
    tensorboard_dir: str | None = None
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    weights: str | None = "imagenet"
    dropout: float = 0.2
    fine_tune_epochs: int = 0
    fine_tune_at: int = 0
    fine_tune_learning_rate: float = 1e-5
    early_stopping_patience: int = 3
    augment: bool = True
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    bn_momentum: float | None = None
    cache_dir: str | None = None
    deterministic: bool = False

    def validate(self) -> TrainConfig:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"--architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if not self.model_dir:
            raise ConfigError("no model directory: pass --model-dir or set AIP_MODEL_DIR")
        if not self.data_uri and not self.split_uri:
            raise ConfigError("no data: pass --data-uri (image folder or TFRecord dir) or --split-uri")
        if self.data_format not in ("auto", "images", "tfrecord"):
            raise ConfigError(f"--data-format must be auto, images or tfrecord, got {self.data_format!r}")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size must be in [32, 1024], got {self.image_size}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.fine_tune_epochs < 0:
            raise ConfigError(f"--fine-tune-epochs must be >= 0, got {self.fine_tune_epochs}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        return self

    @property
    def pretrained(self) -> bool:
        return self.weights is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _weights(value: str) -> str | None:
    return None if value.lower() in ("none", "null", "") else value


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig
    p = argparse.ArgumentParser(prog="python -m dualml.trainer", description="Train, evaluate and export one classifier.")
    p.add_argument("--architecture", required=True, choices=ARCHITECTURES)
    p.add_argument("--data-uri", default="", help="image folder root (<root>/<class>/*.jpg) or TFRecord dir; local or gs://")
    p.add_argument("--split-uri", default=None, help="split.json from the pipeline's staging step (overrides the split args)")
    p.add_argument("--data-format", default=d.data_format, choices=("auto", "images", "tfrecord"))
    p.add_argument("--model-dir", default=os.environ.get("AIP_MODEL_DIR", ""))
    p.add_argument("--checkpoint-dir", default=os.environ.get("AIP_CHECKPOINT_DIR"))
    p.add_argument("--tensorboard-dir", default=os.environ.get("AIP_TENSORBOARD_LOG_DIR"))
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--weights", type=_weights, default=d.weights, help="'imagenet' or 'none' (random init)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs)
    p.add_argument("--fine-tune-at", type=int, default=d.fine_tune_at, help="unfreeze backbone layers from this index")
    p.add_argument("--fine-tune-learning-rate", type=float, default=d.fine_tune_learning_rate)
    p.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience)
    p.add_argument("--augment", type=_bool, default=d.augment)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--bn-momentum", type=float, default=None, help="default: 0.9 when training from scratch")
    p.add_argument("--cache-dir", default=None, help="local folder for downloaded gs:// data")
    p.add_argument("--deterministic", type=_bool, default=d.deterministic,
                   help="bit-reproducible training (tf op determinism; slower on GPUs)")
    return p


def parse_args(argv=None) -> TrainConfig:
    a = build_parser().parse_args(argv)
    return TrainConfig(**{k: v for k, v in vars(a).items()}).validate()
