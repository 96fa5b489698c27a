"""docs/settings.md is generated from the settings classes: it must be current, and every setting documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen() -> object:
    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "docs" / "gen_settings.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settings_doc_is_current_and_complete() -> None:
    gen = _gen()
    text = gen.render()  # type: ignore[attr-defined]
    assert (ROOT / "docs" / "settings.md").read_text() == text, "run `.venv/bin/python docs/gen_settings.py`"
    for title, module, name, _ in gen.SECTIONS:  # type: ignore[attr-defined]
        cls = getattr(importlib.import_module(module), name)
        for field, info in cls.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
            assert f"`{field.upper()}`" in text, f"{field.upper()} missing from docs/settings.md ({title})"
    for seed_name in ("ENABLE_TIER3_CAPTURE", "TIER3_MIN_TRACES", "TIER3_CHECK_INTERVAL_S", "TIER3_SERVE"):
        assert f"`{seed_name}`" in text  # the original system's names are kept
