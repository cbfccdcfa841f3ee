from __future__ import annotations

from tasklab.ports import PortWish
from tasklab.settings import Settings
from tasklab.stack import stack_options


def test_options_and_settings_are_chosen_ports_and_defaults_are_not() -> None:
    def opts(settings: Settings, **given: int | None) -> tuple[PortWish, PortWish | None]:
        o = stack_options(
            settings,
            host=None,
            port=given.get("port"),
            workers=None,
            concurrency=1,
            beat=False,
            exporter_port=given.get("exporter_port"),
            flower=False,
        )
        return o.api, o.exporter

    assert opts(Settings()) == (PortWish(8000), PortWish(9810))
    assert opts(Settings(), port=8123) == (PortWish(8123, "--port"), PortWish(9810))
    api, exporter = opts(Settings(api_port=8124, exporter_port=9900))
    assert api == PortWish(8124, "setting api_port")
    assert exporter == PortWish(9900, "setting exporter_port")
    assert opts(Settings(exporter_port=0))[1] is None
    assert opts(Settings(), exporter_port=0)[1] is None
