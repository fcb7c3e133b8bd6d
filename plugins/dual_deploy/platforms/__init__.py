"""Per-platform builders of a target's TaskGroup.

Every platform builds the same shape (task ids, groups, dependencies) from the same target
config; only the operators behind the task ids differ.

- endpoint targets: ``train >> register_model >> deploy``
- mobile targets:   ``train >> convert_tflite >> publish``
"""

from __future__ import annotations

from dual_deploy.config import Config, ConfigError, TargetConfig


def trainer_args(target: TargetConfig, split_uri: str) -> list[str]:
    """The trainer container's args: identical on every platform.

    ``--epochs`` is templated so a manual run's ``epochs`` Param overrides the config.
    """
    t = target.training
    args = [f"--architecture={target.architecture}", f"--split-uri={split_uri}"]
    args += [a for a in t.trainer_args() if not a.startswith("--epochs=")]
    args.append(f"--epochs={{{{ params.epochs or {t.epochs} }}}}")
    return args


def build_target_group(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str):
    if cfg.platform == "local":
        from dual_deploy.platforms import local

        return local.build_target_group(target, cfg, run_uri, split_uri)
    if cfg.platform == "gcp":
        # Imported only here: the Google provider's Vertex AI operators cost 10-15 s to import.
        from dual_deploy.platforms import gcp

        return gcp.build_target_group(target, cfg, run_uri, split_uri)
    raise ConfigError(f"platform {cfg.platform!r} has no task builder; use DUAL_DEPLOY_PLATFORM=local or gcp")
