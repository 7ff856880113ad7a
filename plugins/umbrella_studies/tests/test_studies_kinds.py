"""umbrella-studies names the kinds it reads: `umbrella plugins` lists them."""

from __future__ import annotations

from umbrella_studies import plugin

from umbrella_core.testing import fresh_plugin_manager

KINDS = ["bids", "abcd", "ukb", "hcp", "hbn", "abide"]


def test_the_kinds_are_the_prefixes_the_reader_takes(tmp_path):
    assert plugin.umbrella_study_kinds() == KINDS
    for kind in KINDS:
        assert plugin._kind(f"{kind}:{tmp_path}") == (kind, tmp_path)


def test_the_listing_shows_them():
    infos = {info.name: info for info in fresh_plugin_manager(plugin).plugins()}
    assert infos["test-plugin-0"].study_kinds == tuple(KINDS)
