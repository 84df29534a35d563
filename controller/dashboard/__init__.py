"""The controller's web dashboard at /ui: builds → bundles → rollouts → devices → telemetry, for people.

`pages` renders it from the same objects the REST API serves; `session` signs people in with an API
token (a cookie) and keeps CSRF out of its forms. Scripts and styles are vendored under static/ (htmx,
uPlot; static/vendor/VENDORED.json names each file's package, version, licence and sha256): nothing is
fetched from elsewhere at run time and no JavaScript build step exists."""

from importlib import resources

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .pages import SignInFirst, router, to_signin


def install(app: FastAPI) -> None:
    """The dashboard's pages and static files on `app`."""
    app.include_router(router)
    app.add_exception_handler(SignInFirst, to_signin)
    static = resources.files("slmops.controller.dashboard") / "static"
    app.mount("/ui/static", StaticFiles(directory=str(static)), name="dashboard-static")
