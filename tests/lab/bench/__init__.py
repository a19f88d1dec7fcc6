"""mcrelay's published benchmark: mcrelay vs kernel multicast forwarding vs socat.

    scripts/bench            # full: 1M datagrams per run, 50k..400k pps + unpaced, 2 repeats
    scripts/bench --quick    # 200k datagrams, fewer rates, 1 repeat: a few minutes

Run as root through scripts/bench, which installs what is missing (socat, smcroute, ethtool,
matplotlib). Everything happens in network namespaces this script makes and deletes; traffic
goes only to 239.0.0.0/8 inside them. Method, placement and caveats: docs/benchmarks/README.md.
Results: OUT/results.json, OUT/results.md, OUT/loss.png (OUT: docs/benchmarks, or
docs/benchmarks/quick with --quick).
"""
