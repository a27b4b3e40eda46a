"""pdserve: disaggregated prefill/decode LLM serving (the Splitwise design).

The import package `pdserve` is this folder; `pdserve.shared` and
`pdserve.loadgen` are mapped onto the top-level `shared/` and `loadgen/`
folders (see pyproject.toml).
"""

__version__ = "0.1.0"
