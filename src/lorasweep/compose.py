"""Hydra configs -> RunConfig: where lorasweep's config groups live, the user's extra folders, the
typed schema, and the one place YAML becomes dataclasses. Used by every command and by the search
(which composes each trial's config); the commands themselves are in cli.py and plan_cli.py.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, RunConfig

CONF_PACKAGE = "lorasweep.conf"
USER_DIRS_ENV = "LORASWEEP_CONFIG_DIR"


def conf_dir() -> str:
    """The folder of lorasweep's own config groups: the package lorasweep.conf, which is the
    repository's conf/ in an editable install and <site-packages>/lorasweep/conf in a wheel
    (pyproject.toml maps one onto the other). LORASWEEP_CONF replaces it wholesale."""
    env = os.environ.get("LORASWEEP_CONF")
    if env:
        return str(Path(env).resolve())
    root = resources.files(CONF_PACKAGE)
    if isinstance(root, Path):
        return str(root)
    return f"pkg://{CONF_PACKAGE}"  # not on a file system (zipped): Hydra reads the package itself


def user_config_dirs() -> list[str]:
    """Extra config folders from LORASWEEP_CONFIG_DIR (os.pathsep-separated), searched after
    lorasweep's own: a user's model/my_model.yaml or sweep/my_study.yaml becomes model=my_model,
    sweep=my_study. Same role as Hydra's --config-dir, for every lorasweep command."""
    raw = os.environ.get(USER_DIRS_ENV, "")
    return [str(Path(d).expanduser().resolve()) for d in raw.split(os.pathsep) if d.strip()]


def check_user_config_dirs() -> str | None:
    """One line naming a LORASWEEP_CONFIG_DIR entry that is not a folder, else None."""
    for d in user_config_dirs():
        if not Path(d).is_dir():
            return f"no such config folder: {d} ({USER_DIRS_ENV} / --config-dir)"
    return None


class UserConfigDirs(SearchPathPlugin):
    """Adds user_config_dirs() to the search path of compositions whose main config is lorasweep's."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        ours = {conf_dir(), f"pkg://{CONF_PACKAGE}"}
        mains = [e.path.removeprefix("file://") for e in search_path.get_path() if e.provider == "main"]
        if not any(m in ours for m in mains):
            return
        for d in user_config_dirs():
            search_path.append(provider=USER_DIRS_ENV, path=f"file://{d}")


# Study files set alpha relative to r (lora.alpha='${mul:${lora.r},2}'); registered at import so
# jobs of process-per-run launchers, which unpickle `task`, resolve it too.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)


def register_schema() -> None:
    """The typed schema, and the user config folders (every composition calls this first)."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    Plugins.instance().register(UserConfigDirs)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The one place YAML becomes dataclasses; type errors name their field."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError([f"{key}: {msg}"]) from None
