"""``python -m stepdistill <command>`` (and ``accelerate launch -m stepdistill <command>``): the same as ``stepdistill``."""

import sys

from .cli import main

sys.exit(main())
