"""Cluster planner: simulate a trace on candidate clusters and pick the best designs.

- `perf_model`: profile CSVs (Splitwise's format) -> prefill and decode-step times.
- `hardware`: machine types (cost, power, memory) and model sizes.
- `trace`: the simulator's view of a trace (loading is `pdserve.loadgen.traces`).
- `simulator`: discrete-event cluster simulation running the router's own policies.
- `slo`: SLOs (absolute or Splitwise-style slowdowns) and their check.
- `search`: designs (Splitwise's AA/HH/HA/HHcap, colocated baselines) and the searches.
- `plan`, `report`, `cli`: `pdserve plan`.
- `profiler`, `profile_cli`: `pdserve profile`, which measures an engine into a profile.
"""
