"""YAML configs with `key.sub=value` command-line overrides (OmegaConf), stored with every run,
and the --help layout every command shares."""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load `path`, following `defaults: other.yaml` (relative to it) first, then apply overrides.
    A key that the base config does not have (in a child YAML or an override) is an error naming
    it and the closest keys there are: a misspelt key must not become a silently new one."""
    path = Path(path)
    cfg = OmegaConf.load(path)
    base = cfg.pop("defaults", None)
    if base is not None:
        parent = load_config(path.parent / base)
        check_keys(parent, cfg, f"{path} (over {base})")
        cfg = OmegaConf.merge(parent, cfg)
    update = OmegaConf.from_dotlist(list(overrides))
    check_keys(cfg, update, f"override of {path}")
    cfg = OmegaConf.merge(cfg, update)
    OmegaConf.set_struct(cfg, True)  # later attribute writes are held to the same keys
    return cfg


def check_keys(base: DictConfig, update: DictConfig, where: str, prefix: str = ""):
    for key, value in update.items_ex(resolve=False):
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base.keys()], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else \
                f"; valid here: {', '.join(prefix + str(k) for k in base.keys())}"
            raise ValueError(f"{where}: unknown config key '{prefix}{key}'{hint}")
        if isinstance(value, DictConfig) and isinstance(base.get(key), DictConfig):
            check_keys(base[key], value, where, f"{prefix}{key}.")


def save_config(cfg: DictConfig, path: str | Path):
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, then each option with its one line and its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and not action.required and "%(default)" not in text and \
                action.default not in (None, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text
