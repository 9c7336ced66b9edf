"""The typed settings: precedence flag > env > default, parsing, and the generated docs."""

import argparse
import ipaddress
from pathlib import Path

import pytest

from pipeline import settings as cfg


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, cfg.CollectorSettings, cfg.KafkaSettings)
    return parser.parse_args(list(argv))


def test_defaults_without_env_or_flags():
    s = cfg.load(cfg.CollectorSettings, _parse(), env={})
    assert s.port == 8080 and s.pixel_path == "/t.gif" and s.trusted_proxies == []


def test_flag_beats_env_beats_default():
    env = {"COLLECTOR_PORT": "9001", "COLLECTOR_HOST": "0.0.0.0"}
    s = cfg.load(cfg.CollectorSettings, _parse("--collector-port", "9002"), env=env)
    assert s.port == 9002  # flag
    assert s.host == "0.0.0.0"  # env
    assert s.beacon_path == "/collect"  # default


def test_types_are_parsed():
    env = {"COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8, ::1", "COLLECTOR_PUBLISH_TIMEOUT": "2.5"}
    s = cfg.load(cfg.CollectorSettings, None, env=env)
    assert s.trusted_proxies == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert s.publish_timeout_s == 2.5


def test_bad_value_is_a_clear_error():
    with pytest.raises(SystemExit, match="COLLECTOR_PORT"):
        cfg.load(cfg.CollectorSettings, None, env={"COLLECTOR_PORT": "eighty"})


def test_configuration_doc_is_current():
    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == cfg.reference_markdown(), "run: python -m pipeline.settings > docs/configuration.md"
