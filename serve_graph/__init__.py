"""Music source separation (Demucs v4) as a Ray Serve deployment graph.

`serve_graph.engine` holds the numeric engine (importable without Ray); the deployments live in
`serve_graph.decode`, `.separate`, `.encode`, `.ingress` and are assembled by `serve_graph.app`.
"""
