"""Typed settings: unknown keys fail at once, naming the key; lists become tuples."""

from __future__ import annotations

import pytest

from bismap.models import ModelSettings
from bismap.settings import SettingsError, from_dict, to_dict, with_run_seed
from bismap.training.supervised import TrainSettings


def test_unknown_key_names_key_and_section():
    with pytest.raises(SettingsError, match=r"warmup.optimizer: unknown key\(s\) \['lr'\]"):
        from_dict(TrainSettings, {"iterations": 1, "batch_size": 2, "optimizer": {"lr": 0.1}}, "warmup")


def test_missing_required_key():
    with pytest.raises(SettingsError, match="missing required key 'batch_size'"):
        from_dict(TrainSettings, {"iterations": 1}, "warmup")


def test_nested_values_and_round_trip():
    settings = from_dict(TrainSettings, {"iterations": 7, "batch_size": 2, "optimizer": {"learning_rate": 1},
                                         "augment": {"crop_size": [32, 48]}}, "warmup")
    assert settings.optimizer.learning_rate == 1.0 and isinstance(settings.optimizer.learning_rate, float)
    assert settings.augment.crop_size == (32, 48)
    assert to_dict(settings)["augment"]["crop_size"] == [32, 48]
    assert from_dict(TrainSettings, to_dict(settings), "again") == settings


def test_model_defaults_are_the_paper_network():
    settings = from_dict(ModelSettings, {}, "model")
    assert (settings.backbone_depth, settings.output_stride, settings.feature_dim) == (101, 16, 256)


def test_run_seed_offsets_every_seed_key_at_any_depth():
    settings = {"seed": 3, "iterations": 5, "training": {"seed": 0, "optimizer": {"learning_rate": 0.01}},
                "splits": [{"count": 2, "seed": 101}, {"seed": 202}], "seeds_used": [1, 2], "flag": True}
    assert with_run_seed(settings, 2) == {"seed": 5, "iterations": 5,
                                          "training": {"seed": 2, "optimizer": {"learning_rate": 0.01}},
                                          "splits": [{"count": 2, "seed": 103}, {"seed": 204}],
                                          "seeds_used": [1, 2], "flag": True}
    split = with_run_seed({"count": 2000, "seed": 101}, "3", stride=1000)  # a wildcard value is a string
    assert split == {"count": 2000, "seed": 3101} and type(split["seed"]) is int
    assert with_run_seed(settings, 0) == settings  # run seed 0 is the configured run
    assert settings["training"]["seed"] == 0  # the config itself is left alone
    assert repr(with_run_seed(({"seed": 1},), 1)) == "[{'seed': 2}]"  # builtin lists: params compare by repr


def test_overrides_merge_key_by_key_and_refuse_unknown_keys():
    from bismap.settings import merged

    base = {"training": {"iterations": 10, "optimizer": {"learning_rate": 0.01, "momentum": 0.9}}, "tau": 1.0}
    result = merged(base, {"training": {"optimizer": {"learning_rate": 0.02}}, "tau": {"memory": 0.5}}, "v")
    assert result == {"training": {"iterations": 10, "optimizer": {"learning_rate": 0.02, "momentum": 0.9}},
                      "tau": {"memory": 0.5}}
    assert base["training"]["optimizer"]["learning_rate"] == 0.01  # not mutated
    with pytest.raises(SettingsError, match=r"v.training: cannot override 'steps'"):
        merged(base, {"training": {"steps": 3}}, "v")


def test_run_relative_values_resolve_against_the_run_length():
    from bismap.settings import resolve_run_relative

    settings = {"ema_decay": {"memory": 0.1}, "interval": {"run_fraction": 0.25}, "plain": 0.99, "nested": {"m": {"memory": 1.0}}}
    resolved = resolve_run_relative(settings, 1000)
    assert resolved == {"ema_decay": pytest.approx(0.99), "interval": 250, "plain": 0.99,
                        "nested": {"m": pytest.approx(0.999)}}
    assert resolve_run_relative({"m": {"memory": 0.1}}, 90_000)["m"] == pytest.approx(1 - 1 / 9000)
    with pytest.raises(SettingsError, match="s.m: memory must be a number > 0"):
        resolve_run_relative({"m": {"memory": 0}}, 10, "s")


def test_integer_settings_take_integral_floats_and_refuse_the_rest_naming_the_key():
    settings = from_dict(TrainSettings, {"iterations": 5.0, "batch_size": 4}, "warmup")
    assert settings.iterations == 5 and isinstance(settings.iterations, int)
    for bad in (5.5, "5", True):
        with pytest.raises(SettingsError, match=r"warmup.iterations: expected an integer, got"):
            from_dict(TrainSettings, {"iterations": bad}, "warmup")


def test_execution_settings_split_off_at_any_depth_and_merge_back():
    from types import SimpleNamespace

    from bismap.settings import ExecutionSettings, job_settings, split_execution, with_execution

    settings = {"training": {"iterations": 10, "workers": 2, "log_interval": 5, "optimizer": {"lr": 0.1}},
                "workers": 1, "batch_size": 8}
    result, execution = split_execution(settings)
    assert result == {"training": {"iterations": 10, "optimizer": {"lr": 0.1}}, "batch_size": 8}
    assert execution == {"training": {"workers": 2, "log_interval": 5}, "workers": 1}
    assert with_execution(result, ExecutionSettings(execution)) == settings
    assert split_execution(settings, ("batch_size",))[1] == {"batch_size": 8}
    params = SimpleNamespace(settings=result, get=lambda name, default: {"execution": ExecutionSettings(execution)}
                             .get(name, default))
    assert job_settings(params) == settings
