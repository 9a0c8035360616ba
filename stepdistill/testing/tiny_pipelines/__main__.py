"""``python -m stepdistill.testing.tiny_pipelines OUT_DIR``: every tiny family under OUT_DIR."""

from . import main

main()
