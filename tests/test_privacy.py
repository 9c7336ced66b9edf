"""IP storage modes: anonymized (IPv4 /24, IPv6 /48), full (normalised), none."""

from __future__ import annotations

import pytest

from pipeline.settings import EnrichSettings
from processors.privacy import IP_STORAGE_MODES, ip_storer, store_ip

CASES = [
    # ip, anonymized, full
    ("81.2.69.142", "81.2.69.0", "81.2.69.142"),
    ("10.1.2.3", "10.1.2.0", "10.1.2.3"),
    ("255.255.255.255", "255.255.255.0", "255.255.255.255"),
    ("0.0.0.0", "0.0.0.0", "0.0.0.0"),
    (" 81.2.69.142\n", "81.2.69.0", "81.2.69.142"),
    ("2001:db8:1234:5678:9abc:def0:1234:5678", "2001:db8:1234::", "2001:db8:1234:5678:9abc:def0:1234:5678"),
    ("2001:DB8:0001:0000:0000:0000:0000:0001", "2001:db8:1::", "2001:db8:1::1"),
    ("2a02:cf40:ffff:ffff::1", "2a02:cf40:ffff::", "2a02:cf40:ffff:ffff::1"),
    ("2001:db8::", "2001:db8::", "2001:db8::"),
    ("::1", "::", "::1"),
    ("fe80::1%eth0", "fe80::", "fe80::1"),  # zone ids are dropped
    # IPv4-mapped IPv6 is the IPv4 address it carries
    ("::ffff:81.2.69.142", "81.2.69.0", "81.2.69.142"),
    ("::FFFF:5102:458e", "81.2.69.0", "81.2.69.142"),
]

GARBAGE = [
    None,
    "",
    "   ",
    "garbage",
    "81.2.69",
    "81.2.69.256",
    "81.2.69.142.7",
    "01.2.69.142",  # leading zeros are ambiguous (octal?), refused
    "81.2.69.142:8080",
    "2001:db8:::1",
    "2001:db8::1::2",
    "[2001:db8::1]",
    "81.2.69.0/24",
    "1" * 10_000,
    12345,
    b"81.2.69.142",
    ["81.2.69.142"],
]


@pytest.mark.parametrize("ip, anonymized, full", CASES)
def test_anonymized(ip, anonymized, full):
    assert store_ip(ip, "anonymized") == anonymized
    assert store_ip(ip) == anonymized  # the default


@pytest.mark.parametrize("ip, anonymized, full", CASES)
def test_full_is_normalised(ip, anonymized, full):
    assert store_ip(ip, "full") == full


@pytest.mark.parametrize("ip, anonymized, full", CASES)
def test_none_stores_nothing(ip, anonymized, full):
    assert store_ip(ip, "none") is None


@pytest.mark.parametrize("mode", IP_STORAGE_MODES)
@pytest.mark.parametrize("ip", GARBAGE)
def test_garbage_gives_none(mode, ip):
    assert store_ip(ip, mode) is None


def test_ip_storer_checks_mode_once():
    store = ip_storer("anonymized")
    assert store("81.2.69.142") == "81.2.69.0"
    assert store("2001:db8:1234:5678::1") == "2001:db8:1234::"
    assert ip_storer("full")("81.2.69.142") == "81.2.69.142"
    assert ip_storer("none")("81.2.69.142") is None


@pytest.mark.parametrize("mode", ["", "Anonymized", "partial", None, 1])
def test_unknown_mode_is_refused(mode):
    with pytest.raises(ValueError, match="ip_storage"):
        ip_storer(mode)
    with pytest.raises(ValueError):
        store_ip("81.2.69.142", mode)


def test_settings_default_is_a_valid_mode():
    assert EnrichSettings().ip_storage in IP_STORAGE_MODES
    assert ip_storer(EnrichSettings().ip_storage)("81.2.69.142") == "81.2.69.0"
