"""The links of a lab stack: a ``LinkProxy`` in front of the broker and one in front of the
database (PostgreSQL; SQLite is a file, with no link to cut), and the settings that send every
process of the stack — its workers, its submitters, the lab's own clients — through them.

A drill cuts a link with the proxy's modes (``tasklab.lab.netproxy``), so that it can break
any broker, one the lab does not own included, without stopping it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasklab.lab.netproxy import LinkProxy, ProxyError, through, url_address
from tasklab.settings import Settings

# The settings' URL fields a proxy rewrites when they point at the server it fronts.
URL_FIELDS = ("broker_url", "redis_url", "result_backend", "database_url")
LINK_NAMES = ("broker", "database")


@dataclass
class StackLinks:
    """The stack's proxies by name (``broker``, ``database``), started."""

    proxies: dict[str, LinkProxy] = field(default_factory=dict)

    @property
    def broker(self) -> LinkProxy:
        return self.proxies["broker"]

    @property
    def database(self) -> LinkProxy | None:
        return self.proxies.get("database")

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def server_url(self, url: str) -> str:
        """``url`` as it was before a proxy took it (the server's own host and port)."""
        try:
            address = url_address(url)
        except ProxyError:
            return url
        for proxy in self.proxies.values():
            if proxy.address == address:
                return through(url, *proxy.upstream)
        return url

    def describe(self) -> dict[str, str]:
        """name -> ``proxy address -> server address``, for a result's params."""
        return {
            name: f"{p.listen_host}:{p.port} -> {p.upstream[0]}:{p.upstream[1]}"
            for name, p in self.proxies.items()
        }


def server_urls(settings: Settings) -> dict[str, str]:
    """The URL of each server a link can front: the broker, and PostgreSQL if configured."""
    urls = {"broker": settings.effective_broker_url}
    if settings.database_url and not settings.sync_database_url.startswith("sqlite"):
        urls["database"] = settings.sync_database_url
    return urls


def start_links(settings: Settings) -> tuple[StackLinks, Settings]:
    """Start a proxy in front of each server; the settings with their URLs through them."""
    links = StackLinks()
    try:
        for name, url in server_urls(settings).items():
            links.proxies[name] = LinkProxy.for_url(url, name=name).start()
    except BaseException:
        links.stop()
        raise
    return links, proxied(settings, links)


def proxied(settings: Settings, links: StackLinks) -> Settings:
    """``settings`` with every URL that points at a proxied server sent through its proxy."""
    by_address = {proxy.upstream: proxy for proxy in links.proxies.values()}
    update: dict[str, str] = {}
    for name in URL_FIELDS:
        url = getattr(settings, name)
        if not url:
            continue
        try:
            proxy = by_address.get(url_address(url))
        except ProxyError:  # a unix socket, a file: not a server a link fronts
            continue
        if proxy is not None:
            update[name] = through(url, proxy.listen_host, proxy.port)
    return settings.model_copy(update=update)
