"""Model builders: the cloud model (DenseNet121) and the mobile model (MobileNetV3).

Every model takes float32 RGB in [0, 255]; its own first layers scale the input the way
its backbone expects, so serving and TFLite callers never re-implement preprocessing.
"""

from __future__ import annotations

import keras

ARCHITECTURES = ("densenet121", "mobilenet_v3_small", "mobilenet_v3_large")

# ImageNet statistics used by keras.applications.densenet.preprocess_input ("torch" mode).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(architecture: str, image_size: int, weights: str | None) -> keras.Model:
    shape = (image_size, image_size, 3)
    if architecture == "densenet121":
        return keras.applications.DenseNet121(include_top=False, weights=weights, input_shape=shape, pooling="avg")
    if architecture == "mobilenet_v3_small":
        return keras.applications.MobileNetV3Small(
            include_top=False, weights=weights, input_shape=shape, pooling="avg", include_preprocessing=True
        )
    if architecture == "mobilenet_v3_large":
        return keras.applications.MobileNetV3Large(
            include_top=False, weights=weights, input_shape=shape, pooling="avg", include_preprocessing=True
        )
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_classifier(
    architecture: str,
    num_classes: int,
    image_size: int = 224,
    weights: str | None = "imagenet",
    dropout: float = 0.2,
    bn_momentum: float | None = None,
) -> tuple[keras.Model, keras.Model]:
    """Return (classifier, backbone). The classifier outputs softmax probabilities.

    ``bn_momentum`` overrides BatchNormalization momentum in the backbone: with
    ``weights=None`` and a short schedule the default 0.99 leaves the moving statistics
    near their initial values and evaluation collapses to chance.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    backbone = build_backbone(architecture, image_size, weights)
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    if architecture == "densenet121":
        # keras.applications.densenet.preprocess_input, as layers so it is saved with the model.
        x = keras.layers.Rescaling(1.0 / 255, name="scale")(x)
        x = keras.layers.Normalization(
            mean=list(_IMAGENET_MEAN), variance=[s * s for s in _IMAGENET_STD], name="imagenet_norm"
        )(x)
    x = backbone(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{architecture}_classifier"), backbone


def set_backbone_trainable(
    backbone: keras.Model, trainable: bool, fine_tune_at: int = 0, freeze_batchnorm: bool = True
) -> None:
    """Freeze the backbone, or unfreeze its layers from index ``fine_tune_at`` on.

    When fine-tuning a *pretrained* backbone, BatchNormalization layers stay frozen, as Keras'
    transfer-learning guide recommends (small batches would wreck their statistics). A
    randomly initialised backbone must train them (``freeze_batchnorm=False``): frozen
    initial statistics make MobileNetV3's activations vanish and the model never learns.
    """
    backbone.trainable = trainable
    if not trainable:
        return
    for i, layer in enumerate(backbone.layers):
        frozen = i < fine_tune_at or (freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization))
        layer.trainable = not frozen


def compile_classifier(model: keras.Model, learning_rate: float) -> None:
    """Compile for training (Adam, sparse cross-entropy, accuracy) and create every variable the
    train step needs before it is traced.

    A tf.function whose first trace creates variables is traced a second time. Without a
    distribution strategy scope (CPU or one GPU) Keras builds the optimizer, and a metric given
    by name, lazily inside that first trace: building them here halves the first epoch's tracing
    (DenseNet121 at 64 px on 2 cores: ~40 s of CPU).
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    model.optimizer.build(model.trainable_variables)
