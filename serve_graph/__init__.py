"""Music source separation (Demucs v4) as a Ray Serve deployment graph.

`serve_graph.engine` holds the numeric engine (importable without Ray); the deployments live in
`serve_graph.decode`, `.separate`, `.encode`, `.ingress` and are assembled by `serve_graph.app`.
"""
import os

# Large CPU tensors on transparent huge pages: each forward of htdemucs allocates ~1.6 GB of
# activations, and with 4 KiB pages the kernel spends ~25% of a window zero-filling them.
# Read by PyTorch at its first allocation, so it is set before torch is imported.
if os.environ.get("SERVE_GRAPH_CPU_TUNING", "1") != "0":
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
