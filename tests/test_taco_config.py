"""Process-free tests of the parallel configuration schema and every validation rule."""

from __future__ import annotations

import pytest

from comfy.cli_args import build_parser
from comfy.taco_dit.core.config_manager import (
    AUTO,
    ConfigError,
    OptimizationConfig,
    ParallelConfig,
    load_config,
    read_yaml,
    values_from_args,
)


def test_defaults_are_auto():
    c = ParallelConfig(world_size=4)
    assert c.enabled == AUTO and c.cfg_parallel == AUTO and c.ulysses_degree == AUTO
    assert c.pipeline_parallel is False and c.tensor_parallel is False
    assert not c.lockstep_only  # auto: the planner decides per model
    assert c.strategies_requested() == []
    assert ParallelConfig(world_size=1).lockstep_only


def test_every_strategy_off_is_lockstep():
    assert ParallelConfig(world_size=4, cfg_parallel=False, sequence_parallel=False).lockstep_only
    assert ParallelConfig(world_size=4, cfg_parallel=False, ulysses_degree=1, ring_degree=1).lockstep_only
    assert not ParallelConfig(world_size=4, cfg_parallel=False).lockstep_only


def test_optimization_defaults():
    c = ParallelConfig(world_size=4)
    assert c.optimization.use_cache is True and c.optimization.use_torch_compile is False


def test_disabled_is_lockstep_even_with_strategies_set():
    c = ParallelConfig(world_size=3, enabled=False, cfg_parallel=True, ulysses_degree=4)
    assert c.lockstep_only and c.strategies_requested() == [] and c.cfg_degree == 1


def test_valid_cfg_times_sequence():
    c = ParallelConfig(world_size=8, cfg_parallel=True, ulysses_degree=2, ring_degree=2)
    assert c.sequence_parallel_degree == 4
    assert c.cfg_degree == 2
    assert set(c.strategies_requested()) == {"cfg_parallel", "sequence_parallel"}
    assert not c.lockstep_only


@pytest.mark.parametrize("sp,u,r,expect", [(4, 2, AUTO, (4, 2, 2)), (4, AUTO, 4, (4, 1, 4)), (AUTO, 3, 1, (3, 3, 1))])
def test_sequence_degrees_are_completed(sp, u, r, expect):
    c = ParallelConfig(world_size=expect[0], sequence_parallel_degree=sp, ulysses_degree=u, ring_degree=r)
    assert (c.sequence_parallel_degree, c.ulysses_degree, c.ring_degree) == expect


def test_sequence_degree_must_equal_ulysses_times_ring():
    with pytest.raises(ConfigError, match=r"sequence_parallel_degree 4 != ulysses_degree 2 \* ring_degree 3"):
        ParallelConfig(world_size=6, sequence_parallel_degree=4, ulysses_degree=2, ring_degree=3)


def test_ulysses_must_divide_sequence_degree():
    with pytest.raises(ConfigError, match=r"ulysses_degree 3 does not divide sequence_parallel_degree 4.*\[1, 2, 4\]"):
        ParallelConfig(world_size=4, sequence_parallel_degree=4, ulysses_degree=3)


def test_ring_must_divide_sequence_degree():
    with pytest.raises(ConfigError, match="ring_degree 3 does not divide"):
        ParallelConfig(world_size=4, sequence_parallel_degree=4, ring_degree=3)


def test_sequence_parallel_false_with_degree_refused():
    with pytest.raises(ConfigError, match="sequence_parallel is false but its degree is 2"):
        ParallelConfig(world_size=2, sequence_parallel=False, ulysses_degree=2, ring_degree=1)


def test_degrees_must_divide_world_size_and_message_lists_everything():
    with pytest.raises(ConfigError) as e:
        ParallelConfig(world_size=6, cfg_parallel=True, ulysses_degree=2, ring_degree=2)
    msg = str(e.value)
    # ParallelDims-style: every degree and the world size, plus what would work.
    for part in ("cfg=2 * sequence=4 = 8", "world_size 6", "ulysses 2", "ring 2", "pipeline_parallel_degree",
                 "tensor_parallel_degree", "cfg_parallel: true with sequence_parallel_degree: 3",
                 "sequence_parallel_degree: 6", "--nproc_per_node=8"):
        assert part in msg, (part, msg)


def test_remaining_factor_is_data_parallel():
    # cfg 2 on 4 ranks: two CFG pairs (data parallel 2), valid.
    c = ParallelConfig(world_size=4, cfg_parallel=True, ulysses_degree=1, ring_degree=1)
    assert c.cfg_degree == 2 and c.sequence_parallel_degree == 1


def test_degrees_larger_than_world_refused():
    with pytest.raises(ConfigError, match=r"ulysses=3 = 3 do not fit world_size 2"):
        ParallelConfig(world_size=2, ulysses_degree=3)


def test_partial_degrees_must_divide_world():
    ParallelConfig(world_size=4, ulysses_degree=2)  # ring/cfg auto may fill the rest
    with pytest.raises(ConfigError, match="do not fit world_size 6"):
        ParallelConfig(world_size=6, ulysses_degree=4)


def test_cfg_parallel_needs_even_world():
    with pytest.raises(ConfigError, match="cfg=2 = 2 do not fit world_size 3"):
        ParallelConfig(world_size=3, cfg_parallel=True)


@pytest.mark.parametrize("kwargs,what", [({"pipeline_parallel": True}, "Pipeline parallelism"),
                                         ({"pipeline_parallel_degree": 2}, "Pipeline parallelism"),
                                         ({"tensor_parallel": True}, "Tensor parallelism"),
                                         ({"tensor_parallel_degree": 4}, "Tensor parallelism")])
def test_pipeline_and_tensor_parallel_refused_for_now(kwargs, what):
    with pytest.raises(ConfigError, match=f"{what} is not available yet: it comes in a later release"):
        ParallelConfig(world_size=4, **kwargs)


@pytest.mark.parametrize("kwargs,match", [({"ulysses_degree": 0}, "at least 1"),
                                          ({"ring_degree": -2}, "at least 1"),
                                          ({"ulysses_degree": 2.5}, "whole number"),
                                          ({"ulysses_degree": "two"}, "positive integer or auto"),
                                          ({"ulysses_degree": True}, "positive integer or auto"),
                                          ({"cfg_parallel": "maybe"}, "true, false or auto"),
                                          ({"world_size": 0}, "world_size must be a positive integer")])
def test_bad_values_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParallelConfig(**{"world_size": 4, **kwargs})


def test_string_values_are_parsed():
    c = ParallelConfig(world_size=4, cfg_parallel="on", ulysses_degree="2", ring_degree="auto")
    assert c.cfg_parallel is True and c.ulysses_degree == 2 and c.ring_degree == AUTO
    assert OptimizationConfig(use_torch_compile="yes").use_torch_compile is True


def test_yaml_and_flags_precedence(tmp_path):
    path = tmp_path / "taco_dit_config.yaml"
    path.write_text("parallel:\n  enabled: true\n  cfg_parallel: true\n  ulysses_degree: 2\n"
                    "optimization:\n  use_torch_compile: false\n  use_cache: false\n")
    args = build_parser().parse_args(["--taco-config", str(path), "--taco-ulysses-degree", "1",
                                      "--taco-ring-degree", "1", "--taco-torch-compile"])
    c = load_config(args, world_size=2)
    assert c.enabled is True and c.cfg_parallel is True
    assert (c.ulysses_degree, c.ring_degree, c.sequence_parallel_degree) == (1, 1, 1)  # flags win
    assert c.optimization.use_torch_compile is True and c.optimization.use_cache is False
    # The YAML alone on 2 ranks asks for cfg 2 x ulysses 2 = 4: refused before anything starts.
    with pytest.raises(ConfigError, match="world_size 2"):
        load_config(build_parser().parse_args(["--taco-config", str(path)]), world_size=2)


def test_yaml_disabled_gives_lockstep(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  enabled: false\n  ulysses_degree: 8\n")
    c = load_config(build_parser().parse_args(["--taco-config", str(path)]), world_size=2)
    assert c.lockstep_only


def test_yaml_unknown_keys_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  ulysess_degree: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ulysess_degree'\] in 'parallel'"):
        read_yaml(str(path))
    path.write_text("paralel:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="unknown section"):
        read_yaml(str(path))
    path.write_text("parallel: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(str(tmp_path / "nope.yaml"))


def test_flag_mapping():
    args = build_parser().parse_args(["--taco-parallel", "off", "--taco-cfg-parallel", "on",
                                      "--taco-sequence-parallel-degree", "4",
                                      "--taco-pipeline-parallel-degree", "1", "--taco-tensor-parallel-degree", "1"])
    v = values_from_args(args)
    assert v["parallel"] == {"enabled": False, "cfg_parallel": True, "sequence_parallel_degree": 4,
                             "pipeline_parallel_degree": 1, "tensor_parallel_degree": 1}
    assert v["optimization"] == {}
    assert values_from_args(build_parser().parse_args([])) == {"parallel": {}, "optimization": {}}


def test_to_dict_round_trips(tmp_path):
    import yaml

    c = ParallelConfig(world_size=4, cfg_parallel=True, ulysses_degree=2)
    path = tmp_path / "out.yaml"
    path.write_text(yaml.safe_dump(c.to_dict()))
    again = load_config(None, world_size=4, path=str(path))
    assert again == c
