"""``python -m clients``: the same as ``newllm-client``."""

import sys

from clients.cli import main

sys.exit(main())
