"""YAML configs with `key.sub=value` command-line overrides (OmegaConf), stored with every run."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load `path`, following `defaults: other.yaml` (relative to it) first, then apply overrides."""
    path = Path(path)
    cfg = OmegaConf.load(path)
    base = cfg.pop("defaults", None)
    if base is not None:
        cfg = OmegaConf.merge(load_config(path.parent / base), cfg)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.set_struct(cfg, True)  # a misspelt override is an error, not a silently new key
    return cfg


def save_config(cfg: DictConfig, path: str | Path):
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
