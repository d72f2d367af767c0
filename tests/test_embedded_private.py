"""The embedded default is private: a 0700 data directory and a key file nobody else can use."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from integrations import ConfigurationError
from integrations._embedded import ensure_key_file, make_private_dir

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_data_dir_and_missing_parents_are_created_0700_under_umask_000(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b" / "integrations"
    ensure_key_file(data_dir)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", data_dir):
        assert mode(directory) == 0o700, directory
    assert mode(data_dir / "keys") == 0o600


@pytest.mark.usefixtures("open_umask")
def test_make_private_dir_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    make_private_dir(existing / "pgdata")
    assert mode(existing) == 0o755
    assert mode(existing / "pgdata") == 0o700


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
def test_a_key_file_others_may_read_or_write_is_refused_with_the_fix(
    tmp_path: Path, bits: int
) -> None:
    keys = ensure_key_file(tmp_path)
    path = tmp_path / "keys"
    path.chmod(bits)
    with pytest.raises(ConfigurationError) as info:
        ensure_key_file(tmp_path)
    assert f"chmod 600 {path}" in info.value.message
    assert f"{bits:04o}" in info.value.message
    assert keys.split(":")[2] not in info.value.message
    path.chmod(0o600)
    assert ensure_key_file(tmp_path) == keys


@pytest.mark.parametrize("bits", [0o600, 0o400])
def test_a_private_key_file_is_used(tmp_path: Path, bits: int) -> None:
    keys = ensure_key_file(tmp_path)
    (tmp_path / "keys").chmod(bits)
    assert ensure_key_file(tmp_path) == keys


def test_a_key_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    keys = ensure_key_file(elsewhere)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keys").symlink_to(elsewhere / "keys")
    with pytest.raises(ConfigurationError) as info:
        ensure_key_file(data_dir)
    assert "symbolic link" in info.value.message
    assert keys.split(":")[2] not in info.value.message


def test_a_dangling_symlink_is_refused_and_not_followed_to_create_a_file(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (tmp_path / "keys").symlink_to(target)
    with pytest.raises(ConfigurationError) as info:
        ensure_key_file(tmp_path)
    assert info.value.code == "configuration", info.value
    assert not target.exists()
