"""Write the versioned JSON Schema files of the message types into ``schemas/json/`` (a developer tool, internal:
``python -m schemas.write_json_schemas`` after a change to ``schemas/messages.py``; a test checks they are current)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    return {f"{name}.v{SCHEMA_VERSION}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
            for name, model in MESSAGE_TYPES.items()}


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for fname, text in render().items():
        (JSON_DIR / fname).write_text(text)
        print(JSON_DIR / fname)


if __name__ == "__main__":
    main()
