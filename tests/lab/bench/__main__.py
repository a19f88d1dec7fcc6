"""``python -m tests.lab.bench``: what scripts/bench runs."""

from tests.lab.bench.main import main

main()
