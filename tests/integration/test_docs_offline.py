"""/docs and /redoc of the real server load every script, style and icon from the server itself (no CDN)."""

from __future__ import annotations

import re
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest

from tests.helpers import ServerHandle, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerHandle:
    with running_server(tmp_path_factory.mktemp("docs"), "--placeholder", model="none.pt") as handle:
        yield handle


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", errors="replace")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_references_only_the_server_itself(server: ServerHandle, page: str) -> None:
    status, text = get(server.base_url + page)
    assert status == 200
    links = Links()
    links.feed(text)
    # Every address in the page (attributes and inline script alike) is on this server.
    quoted = re.findall(r"""["'](https?://[^"']+|/[^"'\s]*)["']""", text)
    urls = set(links.urls) | set(quoted)
    assert any(u.endswith(".js") for u in links.urls), text  # the page does load its UI from somewhere
    for url in urls:
        absolute = urljoin(server.base_url + page, url)
        host = urlparse(absolute).netloc
        assert host == f"127.0.0.1:{server.api_port}", f"{page} references {url} on another host"
    for url in links.urls:
        status, _ = get(urljoin(server.base_url + page, url))
        assert status == 200, url


def test_the_openapi_schema_the_docs_read_is_served(server: ServerHandle) -> None:
    status, text = get(server.base_url + "/openapi.json")
    assert status == 200 and '"/health"' in text

