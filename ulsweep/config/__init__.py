"""Typed experiment configuration: YAML -> frozen dataclasses.

One experiment file drives everything: `ulsweep train ae` reads its `data` and `ae` sections,
`ulsweep train base` its `data` and `base_models` sections, `ulsweep run` all of it.

Every error raised while loading is a `ConfigError` naming the file, the dotted key and the value at
fault, and it is raised before any work starts. Dicts appear only at the YAML / Ray / MLflow boundaries.

    errors.py    ConfigError
    schema.py    the section dataclasses and their checks
    loading.py   YAML / dict -> ExperimentConfig, overrides, to_dict, config_hash
"""
from ulsweep.config.errors import ConfigError
from ulsweep.config.loading import (build, check_data, config_hash, dump_yaml, experiment_from_dict, flatten,
                                    load_experiment, parse_overrides, set_dotted, to_dict)
from ulsweep.config.schema import (AELossConfig, AEModelConfig, AEStageConfig, BaseLossConfig, BaseModelConfig,
                                   BaseStageConfig, DataConfig, EvalConfig, ExperimentConfig, OptimConfig,
                                   ResourcesConfig, ScheduleConfig, SearchConfig, TrackingConfig, TrainConfig)

__all__ = ["ConfigError", "build", "check_data", "config_hash", "dump_yaml", "experiment_from_dict", "flatten",
           "load_experiment", "parse_overrides", "set_dotted", "to_dict", "AELossConfig", "AEModelConfig",
           "AEStageConfig", "BaseLossConfig", "BaseModelConfig", "BaseStageConfig", "DataConfig", "EvalConfig",
           "ExperimentConfig", "OptimConfig", "ResourcesConfig", "ScheduleConfig", "SearchConfig",
           "TrackingConfig", "TrainConfig"]
