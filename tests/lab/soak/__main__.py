"""``python -m tests.lab.soak``: what scripts/soak runs."""

import sys

from tests.lab.soak.main import main

sys.exit(main())
