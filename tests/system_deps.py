"""The system programs some tests drive: Debian's Chromium (through Playwright), a
PostgreSQL cluster (initdb) and Java with PySpark (the Spark engine). A missing one skips its
tests with the reason, except in CI (CI=true), where it fails them: scripts/system_deps.sh
and scripts/install.sh install them there, and a skip would hide that the browser,
PostgreSQL or Spark tests never ran."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import NoReturn

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INITDB_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI services set it; scripts/system_deps.sh reads it the same way)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test for `reason`; in CI, fail it."""
    if in_ci():
        pytest.fail(f"{reason}; with CI=true that fails the test instead of skipping it", pytrace=False)
    pytest.skip(reason)


def chromium() -> Path:
    """Debian's Chromium binary."""
    if not CHROMIUM.exists():
        unavailable(f"Chromium is not installed at {CHROMIUM} (scripts/test.sh installs it with apt-get)")
    return CHROMIUM


def playwright_sync_api():
    """`playwright.sync_api` (the dev extra installs it)."""
    try:
        from playwright import sync_api
    except ImportError as err:
        unavailable(f"playwright is not importable ({err}): pip install -e '.[dev]'")
    return sync_api


def initdb() -> str:
    """The newest installed PostgreSQL's initdb."""
    found = sorted(glob.glob(INITDB_GLOB))
    if not found:
        unavailable(f"PostgreSQL is not installed (no {INITDB_GLOB}): apt-get install postgresql")
    return found[-1]


def java() -> str:
    """The java PySpark starts (the engine's own `find_java`: $JAVA_HOME/bin/java, else PATH)."""
    from dermsight.inference.spark_engine import SparkEngineError, find_java

    try:
        return find_java()
    except SparkEngineError as err:
        unavailable(f"Java is not installed: {err}")


def pyspark():
    """The `pyspark` package (the spark extra installs it)."""
    try:
        import pyspark
    except ImportError as err:
        unavailable(f"pyspark is not importable ({err}): pip install -e '.[spark]'")
    return pyspark
