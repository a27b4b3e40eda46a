"""pdserve's load generator: replays traces or synthetic load against any
OpenAI-compatible endpoint and reports latency, throughput and goodput.

Entry point: `pdserve bench` (see `pdserve.loadgen.cli`).
"""
