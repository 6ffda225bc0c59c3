"""One rule for the lab's folders (issue 22, cifar_core/paths.py): flag, else environment variable,
else the default beside the repo; every entry point resolves them the same way."""
from pathlib import Path

import pytest

from cifar_core import paths
from cifar_core.data import DataSourceError, load_cifar10_for, resolve_data_dir


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in (paths.DATA_ENV, paths.CHECKPOINTS_ENV, paths.EXPORTS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(paths, "DEFAULT_DATA", tmp_path / "default-data")
    return monkeypatch


@pytest.mark.parametrize("resolve,env,default", [
    (paths.checkpoints_dir, paths.CHECKPOINTS_ENV, paths.DEFAULT_CHECKPOINTS),
    (paths.exports_dir, paths.EXPORTS_ENV, paths.DEFAULT_EXPORTS),
])
def test_flag_then_environment_then_default(clean_env, resolve, env, default, tmp_path):
    assert resolve() == default and default.parent == paths.REPO
    clean_env.setenv(env, "")  # empty counts as unset
    assert resolve() == default
    clean_env.setenv(env, str(tmp_path / "env"))
    assert resolve() == tmp_path / "env"
    assert resolve(tmp_path / "flag") == tmp_path / "flag"


def test_data_sources_order(clean_env, tmp_path):
    meta = {"train_config": {"data": "/trained/from"}, "data": {"source": "imagefolder:/recorded/source"}}
    recorded = paths.recorded_data([meta, meta])
    assert recorded == ["/trained/from", "/recorded/source"]
    assert paths.data_sources(None, recorded) == [("/trained/from", "the checkpoint's meta.json"),
                                                  ("/recorded/source", "the checkpoint's meta.json")]
    paths.DEFAULT_DATA.mkdir()
    assert paths.data_sources(None, recorded)[-1] == (str(paths.DEFAULT_DATA), "the default beside the repo")
    clean_env.setenv(paths.DATA_ENV, "/from/env")  # an explicit choice is the only candidate
    assert paths.data_sources(None, recorded) == [("/from/env", "$CIFAR10_DIR")]
    assert paths.data_sources("/flag", recorded) == [("/flag", "--data")]


def test_errors_say_where_the_folder_came_from(clean_env, tmp_path):
    clean_env.setenv(paths.DATA_ENV, str(tmp_path / "env-data"))
    with pytest.raises(DataSourceError, match=r"env-data \(from \$CIFAR10_DIR\) is not CIFAR-10 data"):
        resolve_data_dir()
    with pytest.raises(DataSourceError, match=r"flag-data \(from --data\)"):
        resolve_data_dir(str(tmp_path / "flag-data"))
    clean_env.delenv(paths.DATA_ENV)
    meta = {"train_config": {"data": str(tmp_path / "gone-a")}, "data": {"source": f"x:{tmp_path / 'gone-b'}"}}
    with pytest.raises(DataSourceError) as e:  # every candidate tried, each named
        load_cifar10_for(None, [meta])
    assert "gone-a (from the checkpoint's meta.json)" in str(e.value) and "gone-b" in str(e.value)


def test_checkpoint_commands_find_the_data_they_were_trained_from(clean_env, data_dir, cifar):
    meta = {"train_config": {"data": str(Path(data_dir))}}
    assert load_cifar10_for(None, [meta]).fingerprint == cifar.fingerprint


def test_default_data_beside_the_repo(clean_env, data_dir, cifar):
    clean_env.setattr(paths, "DEFAULT_DATA", Path(data_dir))
    assert resolve_data_dir()[1] == Path(data_dir)
