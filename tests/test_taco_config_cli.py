"""The multi-rank entry point refuses a bad parallel configuration before joining any process group."""

from __future__ import annotations

import logging

import pytest

from comfy.cli_args import build_parser
from comfy.taco_dit.core import execution_engine


def test_bad_degrees_exit_before_init(monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def must_not_init(*a, **k):
        raise AssertionError("init_distributed must not run with a refused config")

    import comfy.taco_dit.core.distributed_manager as dmod

    monkeypatch.setattr(dmod, "init_distributed", must_not_init)
    args = build_parser().parse_args(["--cpu", "--taco-ulysses-degree", "3"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        execution_engine.run(args, start_server=lambda *a, **k: None)
    assert e.value.code == 2
    assert "ulysses=3 = 3 do not fit world_size 2" in caplog.text


def test_pipeline_parallel_flag_refused(monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = build_parser().parse_args(["--cpu", "--taco-pipeline-parallel-degree", "2"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        execution_engine.run(args, start_server=lambda *a, **k: None)
    assert "comes in a later release" in caplog.text
