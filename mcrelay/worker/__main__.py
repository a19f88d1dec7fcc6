"""Internal entry point the supervisor execs for each worker (not for users).

Kept free of the CLI's imports so a replacement worker starts as fast as possible.
"""

from mcrelay.worker.main import main

main()
