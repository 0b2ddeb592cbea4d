"""``python -m server``: the same as ``newllm serve``."""

import sys

from server.cli import main

sys.exit(main())
