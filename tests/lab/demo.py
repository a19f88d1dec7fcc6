"""The demo behind scripts/demo: the relay doing its job across an unroutable boundary.

gen-ns ──veth── relay-ns ──veth── sink-ns. The relay's input has no route back to the source and
strict reverse-path filtering is on, so the kernel drops the stream before any socket sees it.
mcrelay relays it anyway; a data worker is killed mid-stream and the stream carries on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.lab import topology
from tests.lab.processes import end_process
from tests.lab.relay import gen, sink

GROUP, PORT, OUT_GROUP, OUT_PORT = "239.1.1.1", 5000, "239.2.2.2", 5001
RATE, COUNT = 10_000, 50_000


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def main(mcrelay: str) -> None:
    if not topology.have_netns():
        sys.exit("scripts/demo needs root and iproute2 (it builds network namespaces)")
    with topology.chain() as c, tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "control.sock")

        def run(*args: str, show: bool = True) -> str:
            if show:
                print(f"$ mcrelay {' '.join(args)}", flush=True)
            out = subprocess.run(
                [mcrelay, *args, "--socket", sock], check=True, capture_output=True, text=True
            ).stdout
            if show:
                print(out, end="", flush=True)
            return out

        say("topology: gen-ns → relay-ns → sink-ns; the source is unroutable from relay-ns")
        c.relay.ip("addr", "flush", "dev", c.relay_in)
        c.relay.ip("addr", "add", "10.200.77.2/24", "dev", c.relay_in)
        for dev in ("all", "default", c.relay_in):
            c.relay.sysctl(f"net.ipv4.conf.{dev}.rp_filter", "1")
        print(f"source {c.gen_addr} sends {GROUP}:{PORT}; relay-ns has no route back to it "
              "and rp_filter=1")  # fmt: skip

        say("an ordinary socket in relay-ns, joined to the group, receives:")
        with sink(c.relay, GROUP, PORT, c.relay_in, "--duration", "2", "--idle-timeout", "1") as k:
            proc = gen(c.gen, GROUP, PORT, "--rate", "5000", "--count", "5000")
            proc.communicate(timeout=30)
            print(f"{k.result()['received']} packets (the kernel's RPF check dropped them all)")

        say("starting mcrelay in relay-ns (2 data workers)")
        log = open(Path(tmp) / "supervisor.log", "w")  # noqa: SIM115
        sup = subprocess.Popen(
            c.relay.cmd(
                mcrelay,
                "supervisor",
                "--control-socket",
                sock,
                "--num-workers",
                "2",
                "--state-dir",
                str(Path(tmp) / "state"),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 10
            while subprocess.run([mcrelay, "ping", "--socket", sock],
                                 capture_output=True).returncode != 0:  # fmt: skip
                if time.monotonic() > deadline or sup.poll() is not None:
                    sys.exit("the supervisor did not start:\n" + Path(log.name).read_text())
                time.sleep(0.05)
            run("add", "--input-interface", c.relay_in, "--input-group", GROUP,
                "--input-port", str(PORT), "--output", f"{OUT_GROUP}:{OUT_PORT}:{c.relay_out}",
                "--id", "camera-1")  # fmt: skip
            run("workers")

            say(f"streaming {COUNT} packets at {RATE} pps; kill -9 a data worker mid-stream")
            with sink(c.sink, OUT_GROUP, OUT_PORT, c.sink_if, "--count", str(COUNT),
                      "--idle-timeout", "3") as s:  # fmt: skip
                stream = gen(c.gen, GROUP, PORT, "--rate", str(RATE), "--count", str(COUNT))
                killed = False
                t0 = time.monotonic()
                while stream.poll() is None:
                    time.sleep(0.5)
                    st = json.loads(run("stats", "--json", show=False))["rules"][0]
                    out = st["outputs"][0]
                    print(f"  t={time.monotonic() - t0:4.1f}s  in {st['packets_in']:6d} pkts "
                          f"({st['pps_in']:8.0f} pps)   out {out['packets']:6d} pkts",
                          flush=True)  # fmt: skip
                    if not killed and time.monotonic() - t0 > 2:
                        workers = json.loads(run("workers", "--json", show=False))
                        victim = next(w for w in workers if w["id"] == "data-0")
                        os.kill(victim["pid"], signal.SIGKILL)
                        print(f"  kill -9 data-0 (pid {victim['pid']})", flush=True)
                        killed = True
                report = s.result()
            say("what the sink in sink-ns received")
            print(
                f"received {report['received']} of {COUNT}, lost {report['lost']}, "
                f"duplicated {report['duplicated']}, corrupted {report['corrupted']}; latency "
                f"p50 {report['latency_p50_us']} µs, p99 {report['latency_p99_us']} µs"
            )
            run("workers")
            run("stats")
        finally:
            say("stopping mcrelay (SIGTERM) and removing the namespaces")
            end_process(sup, signal.SIGTERM)
            log.close()
        print("supervisor exited with", sup.returncode)


if __name__ == "__main__":
    main(sys.argv[1])
