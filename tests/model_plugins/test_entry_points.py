"""Third-party plugins register in the `dagserve.plugins` entry-point group."""

from __future__ import annotations

import importlib

import pytest

from model_plugins.registry import available, resolve
from tests.plugins import Scale


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """A fake installed distribution on sys.path whose entry point names a plugin."""
    dist = tmp_path / "acme_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dagserve.plugins]\nacme_scale = tests.plugins:Scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    importlib.invalidate_caches()


def test_entry_point_plugin_resolves_by_name(installed_distribution):
    assert resolve("acme_scale") is Scale
    assert available()["acme_scale"] == "tests.plugins:Scale"


def test_unknown_name_lists_what_is_installed(installed_distribution):
    with pytest.raises(LookupError, match="acme_scale"):
        resolve("acme_scael")


def test_built_ins_win_over_entry_points_of_the_same_name(tmp_path, monkeypatch):
    dist = tmp_path / "evil-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dagserve.plugins]\nidentity = tests.plugins:Scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert resolve("identity").__name__ == "Identity"
