"""Per-family hyper-parameters: ``models/families.toml`` (the project's defaults that differ
from each ``Config``), then the TOML file named by ``RECSYS_MODEL_CONFIG``, parsed into the
family's typed ``Config`` once, here at the edge."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from models.catalogue import FAMILIES
from pipeline.settings import REPO_ROOT, Settings

FAMILY_CONFIG_FILE = REPO_ROOT / "models" / "families.toml"


class FamilyConfigError(ValueError):
    """A model config file cannot be read, or names something that is not a family."""


def family_configs(settings: Settings) -> dict[str, dict]:
    """Per-family hyper-parameter overrides: models/families.toml, then RECSYS_MODEL_CONFIG."""
    merged: dict[str, dict] = {}
    for path in (FAMILY_CONFIG_FILE, settings.model_config):
        if path is None:
            continue
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FamilyConfigError(f"model config {path} cannot be read as TOML ({exc}).") from exc
        for family, values in data.items():
            if family not in FAMILIES:
                close = difflib.get_close_matches(family, FAMILIES, n=1)
                hint = f" Did you mean [{close[0]}]?" if close else ""
                raise FamilyConfigError(
                    f"model config {path} has a section [{family}], which is not a family;{hint} "
                    f"known families: {', '.join(sorted(FAMILIES))}."
                )
            merged.setdefault(family, {}).update(values)
    return merged


