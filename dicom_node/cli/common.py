"""What every command shares: the exit statuses, the config option and loading it."""

from __future__ import annotations

import argparse
from enum import IntEnum
from pathlib import Path

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError

__all__ = ["ExitStatus", "CONFIG_HELP", "load", "preset_named", "unknown_destination"]

CONFIG_HELP = "the node's config file (default: %(default)s)"


class ExitStatus(IntEnum):
    """The command's exit status; 3 to 7 are ``serve``'s start-up problems, by name."""

    OK = 0
    FAILURE = 1
    CONFIG_ERROR = 2
    PORT_IN_USE = 3
    PORT_NOT_PERMITTED = 4
    CANNOT_LISTEN = 5
    FILE_UNREADABLE = 6
    FOLDER_UNWRITABLE = 7


def load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def preset_named(config: Config, name: str | None):
    """The model preset called ``name`` (the first one when None); ``ConfigError`` naming the presets."""
    if name is None:
        return config.models[0]
    try:
        return config.preset(name)
    except KeyError:
        raise ConfigError(f"no model preset {name!r}; models are: {', '.join(m.name for m in config.models)}") from None


def unknown_destination(config, name: str) -> None:
    names = ", ".join(d.name for d in config.destinations)
    raise ValueError(f"no destination {name!r} in the configuration; it has {names}")
