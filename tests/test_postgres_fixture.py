"""The test suite's PostgreSQL rule (conftest.py): skip when no server is named, fail when one is
named but the driver is missing or the server cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import POSTGRES_SKIP_REASON, POSTGRES_URL_ENV, postgres_verdict, with_search_path

TESTS = Path(__file__).resolve().parent
# Port 1 on the loopback address: nothing listens there, so the connection is refused at once.
DEAD_SERVER = "postgresql://nobody:s3cret@127.0.0.1:1/none"


def test_no_url_skips_with_the_message_saying_how_to_enable_the_tests() -> None:
    assert postgres_verdict(None) == ("skip", POSTGRES_SKIP_REASON)
    assert postgres_verdict("") == ("skip", POSTGRES_SKIP_REASON)
    # Without a URL the driver is not even looked at.
    assert postgres_verdict(None, ["psycopg (No module named 'psycopg')"])[0] == "skip"
    assert POSTGRES_URL_ENV in POSTGRES_SKIP_REASON


def test_a_url_without_the_driver_or_a_server_fails() -> None:
    action, why = postgres_verdict(DEAD_SERVER, ["psycopg (No module named 'psycopg')"])
    assert action == "fail"
    assert "psycopg" in why and "pip install -e '.[postgres]'" in why and POSTGRES_URL_ENV in why
    action, why = postgres_verdict(DEAD_SERVER, [], "OperationalError: connection refused")
    assert action == "fail"
    assert "connection refused" in why and "cannot be reached" in why
    assert "s3cret" not in why and "nobody:***@127.0.0.1:1" in why


def test_a_url_with_the_driver_and_a_server_runs() -> None:
    assert postgres_verdict(DEAD_SERVER, [], None) is None


def test_the_search_path_joins_the_urls_other_options() -> None:
    assert with_search_path("postgresql://u@h/db", "s1") == (
        "postgresql://u@h/db?options=-csearch_path%3Ds1")
    assert with_search_path("postgresql://u@h/db?sslmode=disable&options=-cwork_mem%3D8MB", "s1") == (
        "postgresql://u@h/db?sslmode=disable&options=-cwork_mem%3D8MB%20-csearch_path%3Ds1")


PROBE = """
def test_probe(postgres_url):
    assert "search_path" in postgres_url
"""
# Loaded before conftest: psycopg cannot be imported, as without the [postgres] extra.
NO_PSYCOPG = "import sys\nsys.modules['psycopg'] = None\n"


def _probe(tmp_path: Path, url: str | None, *plugins: str) -> subprocess.CompletedProcess[str]:
    """pytest in a fresh process, on one test that asks for postgres_url, with tests/conftest.py
    loaded as a plugin (its fixtures, none of this suite's options or installed plugins)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = allow_hosts\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "no_psycopg.py").write_text(NO_PSYCOPG)
    env = {key: value for key, value in os.environ.items() if key != POSTGRES_URL_ENV}
    if url is not None:
        env[POSTGRES_URL_ENV] = url
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # seconds of start-up saved
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(TESTS),
                                                      env.get("PYTHONPATH")]))
    plugin_args = [arg for name in (*plugins, "conftest") for arg in ("-p", name)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *plugin_args,
         "test_probe.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(("case", "url", "plugins", "expected", "words"), [
    pytest.param("unset", None, (), "1 skipped",
                 [POSTGRES_URL_ENV, "postgresql://USER@HOST:5432/DATABASE"], id="unset"),
    pytest.param("no driver", DEAD_SERVER, ("no_psycopg",), "1 error",
                 ["the PostgreSQL driver cannot be imported", "psycopg", "pip install -e '.[postgres]'"],
                 id="no-driver"),
    pytest.param("no server", DEAD_SERVER, (), "1 error",
                 ["cannot be reached", "nobody:***@127.0.0.1:1/none"], id="no-server"),
])
def test_the_rule_holds_in_a_real_pytest_run(
    tmp_path: Path, case: str, url: str | None, plugins: tuple[str, ...], expected: str,
    words: list[str],
) -> None:
    if case == "no server":
        pytest.importorskip("psycopg", reason="the unreachable-server case needs the driver")
    done = _probe(tmp_path, url, *plugins)
    output = done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert expected in summary, output
    assert "skipped" not in summary or case == "unset", output
    assert done.returncode == (0 if case == "unset" else 1), output
    for word in words:
        assert word in output, output
    assert "s3cret" not in output
