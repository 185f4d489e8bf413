"""The HTTP front, one module per concern (in the manner of vLLM's `entrypoints/`):

- `app`: the FastAPI application and what its middleware reads of the replica's settings;
- `errors`: the `{"error", "detail"}` bodies and every exception handler;
- `middleware`: the upload cap and budget, API keys and per-client limits, request counts, CORS;
- `forms`: the form fields derived from `SeparationOptions`, and their checks;
- `openapi`: the served schema's shaping (closed forms, exclusive options, models);
- `pages`: the web page and the offline docs;
- `health`, `separation`, `job_routes`: the routes, as mixins of the `Ingress` deployment.
"""
