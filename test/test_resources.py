"""Where the shipped files are found: a source checkout, or a colcon install's share folder.

The install case is a prefix laid out as colcon installs mail_ros (the package's code under
lib/, its files under share/mail_ros, its marker in the ament index), found by the real
ament_index_python through AMENT_PREFIX_PATH.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mail_ros.resources import DEMO_CHECKPOINT, ResourceError, demo_checkpoint, icil_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_uses_its_own_shipped_checkpoints():
    assert demo_checkpoint() == ROOT / "checkpoints" / "demo"
    assert icil_demo_checkpoint() == ROOT / "checkpoints" / "icil_demo"
    assert (demo_checkpoint() / "config.json").is_file() and (icil_demo_checkpoint() / "config.json").is_file()


def test_an_installed_package_uses_the_demo_checkpoint_in_its_share_folder(tmp_path, monkeypatch):
    prefix = tmp_path / "install" / "mail_ros"
    package_dir = prefix / "lib" / "python3.11" / "site-packages" / "mail_ros"
    package_dir.mkdir(parents=True)
    (package_dir / "__init__.py").touch()
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / "mail_ros").touch()
    (prefix / "share" / "mail_ros" / DEMO_CHECKPOINT).mkdir(parents=True)
    monkeypatch.setenv("AMENT_PREFIX_PATH", f"{tmp_path / 'elsewhere'}:{prefix}")
    assert demo_checkpoint(package_dir) == prefix / "share" / "mail_ros" / "checkpoints" / "demo"


def test_an_installed_package_outside_any_ament_prefix_is_a_clear_error(tmp_path, monkeypatch):
    package_dir = tmp_path / "site-packages" / "mail_ros"
    package_dir.mkdir(parents=True)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "empty"))
    with pytest.raises(ResourceError, match="AMENT_PREFIX_PATH"):
        demo_checkpoint(package_dir)
