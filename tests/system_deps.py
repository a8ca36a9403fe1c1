"""The system programs some tests drive: Debian's Chromium (through Playwright), a
PostgreSQL cluster (initdb), Java with PySpark (the Spark engine), podman (the container
image) and the optional Python extras whole test modules need (Ray, torch). A missing one skips
its tests with the reason, except in CI (CI=true), where it fails them: scripts/system_deps.sh,
scripts/install.sh and scripts/container.sh install them there, and a skip would hide that the
browser, PostgreSQL, Spark, container, Ray or training tests never ran."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INITDB_GLOB = "/usr/lib/postgresql/*/bin/initdb"
CONTAINER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "container.sh"
NO_CONTAINER_TOOLS = 3  # scripts/container.sh's exit status when podman, runc or debootstrap cannot be installed


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI services set it; scripts/system_deps.sh reads it the same way)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def unavailable(reason: str, *, whole_module: bool = False) -> NoReturn:
    """Skip the test (`whole_module`: the test module, when called at its top) for `reason`;
    in CI, fail it."""
    if in_ci():
        pytest.fail(f"{reason}; with CI=true that fails the test instead of skipping it", pytrace=False)
    pytest.skip(reason, allow_module_level=whole_module)


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


def podman_env() -> dict[str, str]:
    """The environment podman runs in: scripts/containers.conf (runc; ulimits this sandbox holds) unless
    CONTAINERS_CONF names another, as scripts/container.sh sets it."""
    default = CONTAINER_SCRIPT.with_name("containers.conf")
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(default))}


def container_image(tag: str) -> str:
    """DermSight's OCI image as `tag`, built by `scripts/container.sh build` (which installs podman where
    it can and makes the Dockerfile's base image locally; podman's layer cache makes a rebuild quick)."""
    result = subprocess.run(["bash", str(CONTAINER_SCRIPT), "build"], env={**podman_env(), "IMAGE": tag},
                            capture_output=True, text=True)
    if result.returncode == NO_CONTAINER_TOOLS:
        unavailable(f"podman cannot run here: {result.stderr.strip()[-500:]}")
    if result.returncode != 0:
        pytest.fail(f"scripts/container.sh build failed ({result.returncode}):\n{result.stderr[-3000:]}", pytrace=False)
    return tag


def python_module(name: str, extra: str):
    """The Python package `name`, which the `extra` extra installs, for a test module's top
    (`torch = system_deps.python_module("torch", "train")`): missing, the module is skipped."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        unavailable(f"{name} is not importable ({err}): pip install -e '.[{extra}]'", whole_module=True)
