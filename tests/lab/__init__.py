"""The lab: what tests and the measuring scripts share, kept out of the shipped package.

Network namespaces and veths (`topology`), a real supervisor subprocess (`daemon`, `stopping`),
a relay with gen and sink processes (`relay`), a frame builder (`frames`), the in-process fake
capture plumbing (`fake_captures`), and the programs behind scripts/: `soak`, `bench`, `measure`,
`demo`. Imported as ``tests.lab``; nothing here is installed with mcrelay.
"""
