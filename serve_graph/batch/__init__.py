"""Batch mode: a folder, list or manifest of songs separated into OUTPUT by one resumable
command on Ray Data (`python -m serve_graph batch INPUT OUTPUT`).

- `songs`: INPUT -> songs (stable ids, URIs);
- `output`: OUTPUT's layout: stems written whole, one record per song, the manifest;
- `stages`: the pipeline's steps (decode tasks, model actors);
- `pipeline`: the Ray Data pipeline and the run (resume, progress, manifest);
- `progress`: what a person reads while it runs.
"""
