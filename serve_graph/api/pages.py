"""The web page (`/ui`) and the API docs (`/docs`, `/redoc`), with Swagger UI's and ReDoc's
files served from the installed `fastapi_offline` package: the docs work without a CDN."""
from pathlib import Path, PurePath

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from .errors import error

UI_PAGE = Path(__file__).parent.parent / "static" / "ui.html"
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")  # Swagger UI 5, ReDoc
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
TITLE = "Stem separation"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def web_page() -> HTMLResponse:
    """The web page: drop a song, follow the job, listen to the stems."""
    return HTMLResponse(UI_PAGE.read_text())


@router.get("/static/{name}")
async def docs_asset(name: str) -> Response:
    """Swagger UI's and ReDoc's files, served here so that /docs works offline."""
    path = DOCS_ASSETS / name
    if PurePath(name).name != name or path.suffix not in ASSET_TYPES or not path.is_file():
        return error(404, "not_found", f"no asset {name!r}")
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} - docs",
                               swagger_js_url="/static/swagger-ui-bundle.js",
                               swagger_css_url="/static/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.png")


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{TITLE} - ReDoc",
                          redoc_js_url="/static/redoc.standalone.js",
                          redoc_favicon_url="/static/favicon.png", with_google_fonts=False)
