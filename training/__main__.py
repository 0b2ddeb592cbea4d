"""``python -m training COMMAND ...`` (and ``torchrun ... -m training train ...``)."""

from __future__ import annotations

import sys

from training.cli import main

sys.exit(main())
