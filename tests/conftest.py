"""Shared test set-up: every test gets its own base directory (models/, input/, output/, user/, temp/)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def base_dir(tmp_path):
    """Re-root folder_paths at a fresh temporary base directory for the test."""
    import folder_paths

    saved = (folder_paths.base_path, folder_paths.output_directory, folder_paths.input_directory,
             folder_paths.temp_directory, folder_paths.user_directory)
    folder_paths.set_base_path(str(tmp_path))
    folder_paths.create_directories()
    yield tmp_path
    folder_paths.set_base_path(saved[0])
    folder_paths.set_output_directory(saved[1])
    folder_paths.set_input_directory(saved[2])
    folder_paths.set_temp_directory(saved[3])
    folder_paths.set_user_directory(saved[4])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models/ folder holding the small demo models, written once per test module."""
    from tests.fixtures.demo_models import write_demo_models

    d = tmp_path_factory.mktemp("models")
    write_demo_models(str(d))
    return str(d)
