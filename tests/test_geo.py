"""GeoLookup against MaxMind's test databases (shared/geoip/, with their .json sources)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from pipeline.settings import EnrichSettings
from processors.geo import NO_GEO, Geo, GeoLookup

GEOIP_DIR = EnrichSettings().geoip_city_db.parent
CITY_DBS = ["GeoIP2-City-Test", "GeoLite2-City-Test"]

LONDON = Geo(
    country="GB",
    region="England",
    city="London",
    location={"latitude": 51.5142, "longitude": -0.0931, "accuracy_radius": 10, "time_zone": "Europe/London"},
)
BOXFORD = Geo(
    country="GB",
    # The first (largest) subdivision; the JSON lists England, then West Berkshire.
    region="England",
    city="Boxford",
    location={
        "latitude": 51.75,
        "longitude": -1.25,
        "accuracy_radius": 100,
        "time_zone": "Europe/London",
        "postal_code": "OX1",
    },
)


@pytest.fixture(scope="module", params=CITY_DBS)
def geo(request):
    with GeoLookup(GEOIP_DIR / f"{request.param}.mmdb") as lookup:
        yield lookup


@pytest.fixture(scope="module")
def city_test_db():
    with GeoLookup(GEOIP_DIR / "GeoIP2-City-Test.mmdb") as lookup:
        yield lookup


def test_london_all_fields(geo):
    assert geo.lookup("81.2.69.142") == LONDON


def test_boxford_all_fields_region_is_first_subdivision(geo):
    assert geo.lookup("2.125.160.216") == BOXFORD


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(geo):
    assert geo.lookup("::ffff:81.2.69.142") == LONDON
    assert geo.lookup(" 81.2.69.142 ") == LONDON


def _json_record(db: str, network: str) -> dict:
    for entry in json.loads((GEOIP_DIR / f"{db}.json").read_text(encoding="utf-8")):
        if network in entry:
            return entry[network]
    raise LookupError(network)


def _expected_from_json(record: dict) -> Geo:
    loc = record.get("location", {})
    location = {k: loc[k] for k in ("latitude", "longitude", "accuracy_radius", "time_zone") if k in loc}
    if "postal" in record:
        location["postal_code"] = record["postal"]["code"]
    subdivisions = record.get("subdivisions") or [{}]
    return Geo(
        country=record.get("country", {}).get("iso_code"),
        region=subdivisions[0].get("names", {}).get("en"),
        city=record.get("city", {}).get("names", {}).get("en"),
        location=location or None,
    )


@pytest.mark.parametrize(
    "network, expected_city",
    [("2001:480:10::/48", "San Diego"), ("2001:218::/32", None), ("2a02:cf40::/29", None)],
)
def test_ipv6_entries_match_the_json_source(city_test_db, network, expected_city):
    record = _json_record("GeoIP2-City-Test", network)
    ip = str(ipaddress.ip_network(network)[1])
    got = city_test_db.lookup(ip)
    assert got == _expected_from_json(record)
    assert got.city == expected_city
    assert got.country is not None and got.location is not None


def test_ipv6_city_entry_fields(city_test_db):
    assert city_test_db.lookup("2001:480:10::1") == Geo(
        country="US",
        region="California",
        city="San Diego",
        location={
            "latitude": 32.7203,
            "longitude": -117.1552,
            "accuracy_radius": 20,
            "time_zone": "America/Los_Angeles",
            "postal_code": "92101",
        },
    )


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",  # private
        "192.168.1.20",
        "172.16.5.4",
        "127.0.0.1",  # loopback
        "::1",
        "169.254.10.1",  # link-local
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",  # unique local
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "0.0.0.0",
        "::",
        "192.0.2.1",  # documentation
        "2001:db8::1",
        "::ffff:10.0.0.1",  # mapped private
        "1.1.1.1",  # global but not in the test database
        "2001:4860:4860::8888",
    ],
)
def test_unplaceable_addresses_give_nulls(geo, ip):
    assert geo.lookup(ip) is NO_GEO


@pytest.mark.parametrize(
    "ip",
    [None, "", "   ", "garbage", "81.2.69", "81.2.69.142.1", "81.2.69.256", "01.2.69.142", "81.2.69.142:443",
     "::ffff::1", "1" * 5000, 12345, b"81.2.69.142", ["81.2.69.142"], 81.2],
)
def test_malformed_input_gives_nulls(geo, ip):
    assert geo.lookup(ip) == Geo(None, None, None, None)


def test_results_are_cached():
    with GeoLookup(GEOIP_DIR / "GeoIP2-City-Test.mmdb", cache_size=2) as lookup:
        first = lookup.lookup("81.2.69.142")
        assert lookup.lookup("81.2.69.142") is first
        assert lookup.cache_info().hits == 1
        lookup.lookup("2.125.160.216")
        lookup.lookup("89.160.20.112")  # evicts London (LRU of 2)
        assert lookup.cache_info().currsize == 2
        assert lookup.lookup("81.2.69.142") == first
        assert lookup.cache_info().misses == 4


def test_country_database_gives_country_only():
    with GeoLookup(GEOIP_DIR / "GeoLite2-Country-Test.mmdb") as lookup:
        assert lookup.lookup("81.2.69.142") == Geo(country="GB")
        assert lookup.lookup("10.0.0.1") is NO_GEO


def test_other_database_kinds_are_refused():
    with pytest.raises(ValueError, match="City or Country"):
        GeoLookup(GEOIP_DIR / "GeoLite2-ASN-Test.mmdb")


def test_missing_database_fails_at_construction(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        GeoLookup(tmp_path / "nope.mmdb")


def test_close():
    lookup = GeoLookup(GEOIP_DIR / "GeoIP2-City-Test.mmdb")
    assert lookup("81.2.69.142") == LONDON
    lookup.close()
    with pytest.raises(ValueError):
        lookup.lookup("81.2.69.142")  # the cache went with the database


def test_settings_default_database_is_a_city_test_database():
    with GeoLookup(EnrichSettings().geoip_city_db) as lookup:
        assert lookup.lookup("81.2.69.142") == LONDON
