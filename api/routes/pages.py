"""The web page (`GET /`) and the API's docs (`GET /docs`), both from files shipped in the package (api/web/), so
they work on a cluster with no route to a CDN. The page is static: it calls the JSON API with fetch."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_PREFIX = "/static"
SWAGGER = f"{STATIC_PREFIX}/vendor/swagger-ui"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")


@router.get("/docs")
def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="paraplan - API docs",
                               swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
                               swagger_css_url=f"{SWAGGER}/swagger-ui.css",
                               swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png")  # fmt: skip


def install_pages(app: FastAPI) -> None:
    """The page's routes and its static files (scripts, styles, vendored Swagger UI) under /static."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=WEB_DIR), name="static")
