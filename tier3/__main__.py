"""``python -m tier3``: the ``tier3`` command."""

from tier3.cli import main

main()
