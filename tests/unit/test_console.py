"""The web console's router (gpufleet.server.console): the page and its assets need no token, hold
no data, are served with a policy that allows no inline script and nothing from elsewhere, and
nothing else of the package can be asked for. Its behaviour in a browser: tests/integration/test_console_lab.py."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from gpufleet.server import console


def client() -> TestClient:
    app = FastAPI()
    app.include_router(console.router())
    return TestClient(app)


def test_the_page_and_its_assets_need_no_token_and_forbid_inline_script_and_other_origins():
    c = client()
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert "<script>" not in html and " on" not in re.sub(r"<noscript>.*?</noscript>", "", html, flags=re.S).lower()
    for src in re.findall(r'(?:src|href)="(/[^"]*)"', html):  # every asset it names is served, from here
        r = c.get(src)
        assert r.status_code == 200 and r.content, src
    assert not re.search(r"https?://", html + c.get("/console/app.css").text)  # no CDN, no web font
    assert c.head("/").status_code == 200


def test_only_the_console_files_are_served():
    c = client()
    for path in ("/console/__init__.py", "/console/..%2F__init__.py", "/console/index.htm", "/console/"):
        assert c.get(path).status_code == 404, path


def test_the_script_never_writes_html():
    js = console.asset("app.js").decode()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)
