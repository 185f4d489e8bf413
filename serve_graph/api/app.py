"""The FastAPI application of the Ingress deployment: error handlers, middleware, the schema's
shaping, the routes of each concern, the page and the docs. Routes that need the replica take
it as a dependency (`replica.this_replica`): the `Ingress` instance, whose mixins hold the
replica's side of each concern."""
from fastapi import FastAPI

from . import (errors, health, job_routes, job_stems, middleware, openapi, pages,
               separation)

app = FastAPI(
    title=pages.TITLE,
    description="Upload a song, get its stems (vocals, drums, bass, other...) back as a ZIP, "
                "separated by Demucs v4 (htdemucs, or another model: GET /models).",
    version="1.0", docs_url=None, redoc_url=None)  # /docs and /redoc in `pages`: no CDN

errors.install(app)
middleware.install(app)
openapi.install(app)
for concern in (health, separation, job_routes, job_stems, pages):
    app.include_router(concern.router)
