"""Operating-system glue: logging, privileges, process names, systemd."""
