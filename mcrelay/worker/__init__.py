"""The worker processes the spawner forks: the entry (main), the control worker, the data worker."""
