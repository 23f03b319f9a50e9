"""geo_router on MaxMind's test databases (from ../shared) and on databases built here with mmdb-writer."""

from __future__ import annotations

import logging
from pathlib import Path

import geoip2.database
import pytest

from geo_router import Datacenter, GeoRouter, haversine_km

SHARED_GEOIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "geoip"
LONDON, MILTON, SINGAPORE = "81.2.69.142", "216.160.83.56", "214.0.0.1"
# Locations as recorded in GeoIP2-City-Test.mmdb for the three test addresses above.
TEST_RECORDS = {
    "81.2.69.142/31": ("London", "GB", 51.5142, -0.0931),
    "216.160.83.56/29": ("Milton", "US", 47.2513, -122.3149),
    "214.0.0.0/16": ("Singapore", "SG", 1.336, 103.7716),
}
DATACENTERS = [
    Datacenter("eu-west", 51.5074, -0.1278, ("http://127.0.0.1:5001",)),
    Datacenter("us-west", 37.7749, -122.4194, ("http://127.0.0.1:5002",)),
    Datacenter("ap-southeast", 1.3521, 103.8198, ("http://127.0.0.1:5003",)),
]


def build_city_db(path: Path, records: dict[str, tuple[str, str, float, float]] = TEST_RECORDS) -> Path:
    """Write a small GeoIP2-City-shaped database with mmdb-writer (used when ../shared is absent)."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
    for network, (city, country, lat, lon) in records.items():
        writer.insert_network(
            IPSet([network]),
            {
                "city": {"names": {"en": city}},
                "country": {"iso_code": country, "names": {"en": country}},
                "location": {"latitude": lat, "longitude": lon},
            },
        )
    writer.to_db_file(str(path))
    return path


@pytest.fixture(scope="session")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MaxMind's GeoIP2 City test database when ../shared has it, else one built here."""
    shared = SHARED_GEOIP / "GeoIP2-City-Test.mmdb"
    if shared.exists():
        return shared
    return build_city_db(tmp_path_factory.mktemp("geoip") / "city.mmdb")


def bad_databases() -> list[Path]:
    return sorted((SHARED_GEOIP / "bad").glob("*.mmdb")) if (SHARED_GEOIP / "bad").is_dir() else []


@pytest.mark.parametrize(("ip", "expected"), [(LONDON, "eu-west"), (MILTON, "us-west"), (SINGAPORE, "ap-southeast")])
def test_nearest_datacenter_for_london_milton_singapore(city_db: Path, ip: str, expected: str) -> None:
    router = GeoRouter(DATACENTERS, default="us-west", db_path=str(city_db))
    assert router.nearest(ip).name == expected


@pytest.mark.skipif(not (SHARED_GEOIP / "GeoLite2-City-Test.mmdb").exists(), reason="needs ../shared GeoLite2 test db")
def test_geolite_test_database_routes_london_and_milton() -> None:
    router = GeoRouter(DATACENTERS, default="ap-southeast", db_path=str(SHARED_GEOIP / "GeoLite2-City-Test.mmdb"))
    assert router.nearest(LONDON).name == "eu-west"
    assert router.nearest(MILTON).name == "us-west"
    assert router.locate(LONDON).city == "London"


def test_locate_returns_city_country_and_coordinates(city_db: Path) -> None:
    location = GeoRouter(DATACENTERS, db_path=str(city_db)).locate(MILTON)
    assert (location.city, location.country) == ("Milton", "US")
    assert location.latitude == pytest.approx(47.2513)
    assert location.longitude == pytest.approx(-122.3149)


def test_unhealthy_nearest_falls_to_next_nearest(city_db: Path) -> None:
    router = GeoRouter(DATACENTERS, default="ap-southeast", db_path=str(city_db))
    assert router.nearest(LONDON, healthy={"us-west", "ap-southeast"}).name == "us-west"
    assert router.nearest(LONDON, healthy=set()) is None


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.7", "::1", "not-an-ip", "8.8.8.8", ""])
def test_private_loopback_invalid_and_unknown_addresses_use_default(city_db: Path, ip: str) -> None:
    router = GeoRouter(DATACENTERS, default="ap-southeast", db_path=str(city_db))
    assert router.locate(ip) is None
    assert router.nearest(ip).name == "ap-southeast"


def test_default_that_is_unhealthy_falls_back_to_first_healthy(city_db: Path) -> None:
    router = GeoRouter(DATACENTERS, default="ap-southeast", db_path=str(city_db))
    assert router.nearest("127.0.0.1", healthy={"us-west", "eu-west"}).name == "eu-west"


def test_lookups_are_cached(city_db: Path) -> None:
    router = GeoRouter(DATACENTERS, db_path=str(city_db), cache_size=8)
    for _ in range(3):
        router.nearest(LONDON)
    assert router.stats()["lookup_cache"] == {"hits": 2, "misses": 1, "entries": 1}


def test_missing_database_logs_once_and_routes_to_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="geo_router"):
        router = GeoRouter(DATACENTERS, default="eu-west", db_path=str(tmp_path / "missing.mmdb"))
        assert router.nearest(MILTON).name == "eu-west"
    assert not router.has_database
    assert len([r for r in caplog.records if "missing.mmdb" in r.getMessage()]) == 1


def test_no_database_configured_routes_to_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEOIP_DB_PATH", raising=False)
    router = GeoRouter(DATACENTERS, default="us-west")
    assert router.nearest(LONDON).name == "us-west"


def test_router_reads_its_database_path_from_its_argument_not_the_environment(
    city_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configuration is read once by the config module; the router only takes what it is given."""
    monkeypatch.setenv("GEOIP_DB_PATH", str(city_db))
    assert not GeoRouter(DATACENTERS, default="us-west").has_database
    assert GeoRouter(DATACENTERS, default="us-west", db_path=str(city_db)).nearest(LONDON).name == "eu-west"


def test_geoip_db_path_from_balancer_config_reaches_the_router(city_db: Path) -> None:
    """GEOIP_DB_PATH is read by lb_config.load_config and handed to the router by the balancer."""
    from lb_config import load_config
    from load_balancer import Balancer, parse_args

    env = {
        "LB_BACKENDS": "http://127.0.0.1:9",
        "LB_DATACENTERS": '[{"name": "eu-west", "lat": 51.5, "lon": -0.1, '
                          '"backends": ["http://127.0.0.1:9"]}]',
        "GEOIP_DB_PATH": str(city_db),
    }
    balancer = Balancer(load_config(parse_args([]), env))
    assert balancer.geo is not None and balancer.geo.has_database


@pytest.mark.skipif(not bad_databases(), reason="needs ../shared corrupt test databases")
@pytest.mark.parametrize("path", bad_databases(), ids=lambda p: p.name)
def test_corrupt_database_logs_one_line_and_routes_to_default(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="geo_router"):
        router = GeoRouter(DATACENTERS, default="us-west", db_path=str(path))
        results = {router.nearest(ip).name for ip in (LONDON, MILTON, SINGAPORE, "127.0.0.1")}
    assert results == {"us-west"}
    assert len(caplog.records) == 1
    assert path.name in caplog.records[0].getMessage()


@pytest.mark.skipif(not bad_databases(), reason="needs ../shared corrupt test databases")
def test_lookup_error_on_a_single_ip_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Opened directly, the corrupt-search-tree database fails on every lookup instead of at open.
    reader = geoip2.database.Reader(str(SHARED_GEOIP / "bad" / "libmaxminddb-corrupt-search-tree.mmdb"))
    with caplog.at_level(logging.ERROR, logger="geo_router"):
        router = GeoRouter(DATACENTERS, default="eu-west", reader=reader)
        assert router.nearest(MILTON).name == "eu-west"
        assert router.nearest(SINGAPORE).name == "eu-west"
    assert len(caplog.records) == 1
    router.close()


def test_builder_database_routes_like_maxminds(tmp_path: Path) -> None:
    """The mmdb-writer fallback is exercised even where ../shared exists."""
    path = build_city_db(tmp_path / "built.mmdb")
    router = GeoRouter(DATACENTERS, default="eu-west", db_path=str(path))
    assert router.has_database
    assert [router.nearest(ip).name for ip in (LONDON, MILTON, SINGAPORE)] == ["eu-west", "us-west", "ap-southeast"]
    assert router.locate(SINGAPORE).city == "Singapore"
    assert router.locate("1.1.1.1") is None


def test_non_city_database_is_refused_with_default_routing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(database_type="GeoIP2-Country")
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    writer.to_db_file(str(tmp_path / "country.mmdb"))
    with caplog.at_level(logging.ERROR, logger="geo_router"):
        router = GeoRouter(DATACENTERS, default="us-west", db_path=str(tmp_path / "country.mmdb"))
    assert not router.has_database
    assert router.nearest(LONDON).name == "us-west"
    assert "not a City" in caplog.text


def test_haversine_london_to_new_york_is_about_5570_km() -> None:
    assert haversine_km(51.5074, -0.1278, 40.7128, -74.0060) == pytest.approx(5570, rel=0.01)
    assert haversine_km(10, 20, 10, 20) == 0


def test_unknown_default_datacenter_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="mars"):
        GeoRouter(DATACENTERS, default="mars", db_path="")
