"""What an operator cares about when a worker dies, measured on a real daemon: packets lost when
a data worker is killed mid-stream (`kill`, scripts/measure-kill) and the time from kill -9 to a
replacement running with its rules, with control-request latency (`restart`,
scripts/measure-restart)."""
