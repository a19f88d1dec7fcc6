"""The demo behind scripts/demo: a supervisor in a namespace, rules, a killed worker coming back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns import topology


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def main(mcrelay: str) -> None:
    if not topology.have_netns():
        sys.exit("scripts/demo needs root and iproute2 (it builds network namespaces)")
    with topology.chain() as c, tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "control.sock")

        def run(*args: str, show: bool = True) -> str:
            cmd = c.relay.cmd(mcrelay, *args, "--socket", sock)
            if show:
                print(f"$ mcrelay {' '.join(args)}", flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            if show:
                print(out, end="", flush=True)
            return out

        say(f"starting the supervisor in namespace {c.relay.name} (2 data workers)")
        log = open(Path(tmp) / "supervisor.log", "w")  # noqa: SIM115
        sup = subprocess.Popen(
            c.relay.cmd(mcrelay, "supervisor", "--control-socket", sock, "--num-workers", "2"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 10
            while (
                subprocess.run(
                    c.relay.cmd(mcrelay, "ping", "--socket", sock), capture_output=True
                ).returncode
                != 0
            ):
                if time.monotonic() > deadline or sup.poll() is not None:
                    sys.exit("the supervisor did not start:\n" + Path(log.name).read_text())
                time.sleep(0.05)
            run("workers")
            say("adding two rules")
            run(
                "add",
                "--input-interface",
                c.relay_in,
                "--input-group",
                "239.1.1.1",
                "--input-port",
                "5000",
                "--output",
                f"239.2.2.1:5000:{c.relay_out}",
                "--id",
                "cam1",
            )
            run(
                "add",
                "--input-interface",
                c.relay_in,
                "--input-group",
                "239.1.1.2",
                "--input-port",
                "5000",
                "--output",
                f"239.2.2.2:5000:{c.relay_out}",
                "--output",
                f"{c.sink_addr}:6000:{c.relay_out}",
                "--id",
                "cam2",
            )
            run("rules")
            workers = json.loads(run("workers", "--json", show=False))
            victim = next(w for w in workers if w["id"] == "data-0")
            say(f"kill -9 data-0 (pid {victim['pid']})")
            os.kill(victim["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            while True:
                w = {x["id"]: x for x in json.loads(run("workers", "--json", show=False))}
                new = w["data-0"]
                if new["pid"] != victim["pid"] and new["state"] == "running" and new["rules"] == 2:
                    break
                if time.monotonic() - t0 > 10:
                    sys.exit("data-0 did not come back")
                time.sleep(0.02)
            print(
                f"data-0 is back as pid {new['pid']} with {new['rules']} rules "
                f"after {time.monotonic() - t0:.2f} s",
                flush=True,
            )
            run("workers")
        finally:
            say("stopping (SIGTERM) and removing the namespaces")
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout=5)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
            log.close()
        print("supervisor exited with", sup.returncode)


if __name__ == "__main__":
    main(sys.argv[1])
