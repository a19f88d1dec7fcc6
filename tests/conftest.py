"""Test policy.

- unit/: pure functions (rules, config, backoff, states, framing, parser, BPF); no I/O but
  socketpairs.
- harness/: the supervisor core in-process against fake workers on real socketpairs, under
  pytest-trio's ``autojump_clock``: timing is asserted exactly, nothing sleeps for real. The fake
  workers run the real worker message loop; only the process is fake.
- integration/: real daemons and workers as subprocesses on a temporary control socket. Every
  process a test starts is ended by PID and reaped in a fixture finalizer, also on failure.
- netns/: real packets in network namespaces the test creates and deletes (root only; skipped
  otherwise). Traffic never leaves those namespaces; every traffic loop is bounded.
Tests poll with deadlines instead of sleeping, and finish in seconds (one lifetime test runs 30 s by
design). Timeouts use ``trio.fail_after`` or explicit deadlines; ``faulthandler_timeout`` dumps a
hung test's stacks.
"""
