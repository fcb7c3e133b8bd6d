"""What the local AutoML search tries for each Vertex AI model type.

Vertex AI's AutoML image classification model types (``AutoMlImageClassificationInputs.ModelType``):
``CLOUD`` (served by Vertex, not exportable) and three exportable edge types trading latency for
quality. Locally each type is a search space over the backbones and image sizes
``dualml.trainer.models`` supports, sized for CPU training from scratch (no pretrained weights can
be downloaded here): the edge types search MobileNetV3 only, small to large as the type asks for
quality; CLOUD may also pick DenseNet121. The search gets a wall-clock limit; how a budget in milli
node hours becomes that limit is the local Vertex AI server's business (emulators/localcloud/pipelines.py).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass

CLOUD = "CLOUD"
MOBILE_TYPES = ("MOBILE_TF_LOW_LATENCY_1", "MOBILE_TF_VERSATILE_1", "MOBILE_TF_HIGH_ACCURACY_1")
MODEL_TYPES = (CLOUD, *MOBILE_TYPES)


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a backbone trained from scratch at one size and learning rate."""

    architecture: str
    image_size: int
    learning_rate: float
    dropout: float = 0.2

    @property
    def key(self) -> str:
        return f"{self.architecture}@{self.image_size}px lr={self.learning_rate:g}"

    def to_dict(self) -> dict:
        return asdict(self)


# (architecture, image sizes) per model type; each pair is tried at every learning rate.
SPACES: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    CLOUD: [("densenet121", (64, 96)), ("mobilenet_v3_large", (96, 128)), ("mobilenet_v3_small", (96, 128))],
    "MOBILE_TF_LOW_LATENCY_1": [("mobilenet_v3_small", (64, 96))],
    "MOBILE_TF_VERSATILE_1": [("mobilenet_v3_small", (96, 128)), ("mobilenet_v3_large", (96,))],
    "MOBILE_TF_HIGH_ACCURACY_1": [("mobilenet_v3_large", (128, 160)), ("mobilenet_v3_small", (160,))],
}
LEARNING_RATES = (1e-3, 3e-3)


def check_model_type(model_type: str) -> str:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    return model_type


def spaces() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``SPACES``, or for every model type the space ``DUALML_AUTOML_SPACE`` names, e.g.
    ``mobilenet_v3_small:32,64;densenet121:64`` (architecture:sizes, ``;`` between architectures): a
    smaller search for small machines and tests, set in the search image's environment
    (emulators/localcloud.yaml)."""
    override = (os.environ.get("DUALML_AUTOML_SPACE") or "").strip()
    if not override:
        return SPACES
    pairs = []
    for part in filter(None, (p.strip() for p in override.split(";"))):
        arch, _, sizes = part.partition(":")
        try:
            pairs.append((arch.strip(), tuple(int(x) for x in sizes.split(","))))
        except ValueError:
            raise ValueError(f"DUALML_AUTOML_SPACE={override!r}: expected architecture:size[,size...] joined by "
                             "';', e.g. mobilenet_v3_small:32,64;densenet121:64") from None
    return dict.fromkeys(MODEL_TYPES, pairs)


def candidates(model_type: str, seed: int = 0) -> list[Candidate]:
    """Every candidate of ``model_type``'s space in a seeded order (the search's sampling order)."""
    check_model_type(model_type)
    grid = [Candidate(arch, size, lr) for arch, sizes in spaces()[model_type] for size in sizes
            for lr in LEARNING_RATES]
    random.Random(f"{model_type}:{seed}").shuffle(grid)
    return grid
