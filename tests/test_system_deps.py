"""In CI (CI=true) a missing Chromium, PostgreSQL, Java or PySpark fails the run instead of
skipping its tests: the fixtures' helpers (system_deps) fail rather than skip, and
scripts/system_deps.sh (which scripts/test.sh runs first) exits non-zero when the install did
not bring Chromium, PostgreSQL and Java."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import system_deps

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(system_deps, "CHROMIUM", tmp_path / "no" / "chromium")
    monkeypatch.setattr(system_deps, "INITDB_GLOB", str(tmp_path / "no" / "*" / "bin" / "initdb"))
    monkeypatch.setitem(sys.modules, "playwright", None)  # `import playwright` raises ImportError
    monkeypatch.setitem(sys.modules, "pyspark", None)
    for module in ("ray", "ray.data", "torch"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no" / "bin"))  # no java on PATH


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
@pytest.mark.parametrize("helper", ["chromium", "initdb", "playwright_sync_api", "java", "pyspark"])
def test_in_ci_a_missing_program_fails_the_test(nothing_installed, monkeypatch, ci, helper):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="with CI=true that fails the test") as failed:
        getattr(system_deps, helper)()
    assert not isinstance(failed.value, pytest.skip.Exception)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
@pytest.mark.parametrize("helper", ["chromium", "initdb", "playwright_sync_api", "java", "pyspark"])
def test_outside_ci_a_missing_program_skips_the_test(nothing_installed, monkeypatch, ci, helper):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="not installed|not importable") as skipped:
        getattr(system_deps, helper)()
    assert "CI=true" not in str(skipped.value)


@pytest.mark.parametrize(("module", "extra"), [("ray.data", "scale"), ("torch", "train")])
def test_a_missing_python_extra_skips_its_module_or_fails_in_ci(nothing_installed, monkeypatch, module, extra):
    """What test_ray_engine.py and test_ddp.py call at their top instead of pytest.importorskip."""
    monkeypatch.delenv("CI", raising=False)
    wanted = f"{module} is not importable .*pip install -e '.\\[{extra}\\]'"
    with pytest.raises(pytest.skip.Exception, match=wanted) as skipped:
        system_deps.python_module(module, extra)
    assert skipped.value.allow_module_level
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="with CI=true that fails the test"):
        system_deps.python_module(module, extra)


@pytest.mark.parametrize(("ci", "outcome"), [(None, "1 skipped"), ("true", "1 error")])
def test_a_module_needing_a_missing_extra_is_skipped_whole_or_errors_in_ci(tmp_path, ci, outcome):
    """A real pytest run of a module whose top asks for a package that is not installed."""
    (tmp_path / "test_needs_extra.py").write_text(
        "import system_deps\n\nsystem_deps.python_module('dermsight_no_such_package', 'scale')\n\n\n"
        "def test_never_runs():\n    raise AssertionError\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO / "tests")}
    if ci:
        env["CI"] = ci
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-rs",
                             str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert outcome in result.stdout, result.stdout
    assert ("with CI=true that fails the test" in result.stdout) == bool(ci)
    assert result.returncode == (2 if ci else 5)  # 2: a collection error; 5: no test left to run


def test_installed_programs_are_found_in_ci(tmp_path, monkeypatch):
    chromium = tmp_path / "chromium"
    chromium.touch()
    for version in ("15", "17"):
        (tmp_path / "pg" / version / "bin").mkdir(parents=True)
        (tmp_path / "pg" / version / "bin" / "initdb").touch()
    monkeypatch.setattr(system_deps, "CHROMIUM", chromium)
    monkeypatch.setattr(system_deps, "INITDB_GLOB", str(tmp_path / "pg" / "*" / "bin" / "initdb"))
    monkeypatch.setenv("CI", "true")
    assert system_deps.chromium() == chromium
    assert system_deps.initdb() == str(tmp_path / "pg" / "17" / "bin" / "initdb")  # the newest


def test_java_is_found_through_java_home_or_path(tmp_path, monkeypatch):
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    monkeypatch.setenv("PATH", str(tmp_path / "no" / "bin"))
    assert system_deps.java() == str(java)
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(java.parent))
    assert system_deps.java() == str(java)


def run_system_deps(tmp_path: Path, ci: str | None, installed: bool) -> subprocess.CompletedProcess:
    """scripts/system_deps.sh with its paths in `tmp_path` and an apt-get that only records its
    calls and whose install fails (as with no such package), so nothing is ever installed for real."""
    calls = tmp_path / "apt-get.calls"
    apt_get = tmp_path / "apt-get"
    apt_get.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = update ] || exit 100\n')
    apt_get.chmod(0o755)
    chromium = tmp_path / "bin" / "chromium"
    initdb = tmp_path / "postgresql" / "17" / "bin" / "initdb"
    java = tmp_path / "jre" / "bin" / "java"
    if installed:
        for program in (chromium, initdb, java):
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"CHROMIUM": str(chromium), "INITDB_GLOB": str(tmp_path / "postgresql" / "*" / "bin" / "initdb"),
            "JAVA": str(java), "APT_GET": str(apt_get)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["bash", str(REPO / "scripts" / "system_deps.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_script_fails_in_ci_when_the_install_did_not_bring_them(tmp_path):
    result = run_system_deps(tmp_path, ci="true", installed=False)
    assert result.returncode != 0
    assert "error: CI=true and chromium postgresql openjdk-17-jre-headless not installed" in result.stderr
    if os.geteuid() == 0:  # root: it tried to install them first
        assert "install -y -qq chromium postgresql openjdk-17-jre-headless" in (tmp_path / "apt-get.calls").read_text()


def test_the_script_only_warns_outside_ci(tmp_path):
    result = run_system_deps(tmp_path, ci=None, installed=False)
    assert result.returncode == 0
    warning = "warning: chromium postgresql openjdk-17-jre-headless not installed; their tests will be skipped"
    assert warning in result.stderr
    assert "error:" not in result.stderr


@pytest.mark.parametrize("ci", ["true", None])
def test_the_script_passes_quietly_when_all_are_installed(tmp_path, ci):
    result = run_system_deps(tmp_path, ci=ci, installed=True)
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "apt-get.calls").exists()  # nothing to install


def test_the_script_finds_java_through_java_home_or_path(tmp_path):
    """JAVA unset: $JAVA_HOME/bin/java counts, as PySpark would start it, and so does java on
    PATH; with neither, Java is missing (Chromium and PostgreSQL are there in this test)."""
    tools, home = tmp_path / "tools", tmp_path / "jdk"
    chromium, initdb = tmp_path / "bin" / "chromium", tmp_path / "postgresql" / "17" / "bin" / "initdb"
    for program in (chromium, initdb, home / "bin" / "java"):
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    tools.mkdir()
    (tools / "id").symlink_to(shutil.which("id"))  # all the script needs from PATH, and no java
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "JAVA", "JAVA_HOME")}
    env |= {"CHROMIUM": str(chromium), "INITDB_GLOB": str(tmp_path / "postgresql" / "*" / "bin" / "initdb"),
            "APT_GET": "false", "CI": "true", "PATH": str(tools)}

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "system_deps.sh")], env=env | extra,
                              capture_output=True, text=True, timeout=60)

    assert (run(JAVA_HOME=str(home)).returncode, run(JAVA_HOME=str(home)).stderr) == (0, "")
    assert run(PATH=f"{tools}:{home / 'bin'}").returncode == 0
    missing = run()
    assert missing.returncode != 0
    assert "error: CI=true and openjdk-17-jre-headless not installed" in missing.stderr
    assert "java on PATH" in missing.stderr
