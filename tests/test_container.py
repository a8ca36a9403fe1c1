"""The OCI image itself (Dockerfile), built by scripts/container.sh and run with podman: it
refuses to serve without an API key, serves as a non-root user with a key made by its own
`dermsight keys create`, scores a real dermoscopic image exactly as `dermsight predict` on the
host does, keeps its patients across a restart on the same volume, stores in PostgreSQL when
told to, and scores a read-only mounted folder with its own `dermsight predict`.

The image is built once per module (podman's layer cache makes a rebuild after a source change a
matter of seconds). Without podman the tests skip; with CI=true they fail (system_deps)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pandas as pd
import pytest
import system_deps
from live_server import free_port

from dermsight.serving.storage.repository import Storage

IMAGE = "localhost/dermsight:test"
READY_WITHIN = 60.0  # seconds from `podman run` to /api/health answering 200 (bench/container.py measures it)
SCANS = ("ISIC_0024306", "ISIC_0024307", "ISIC_0024310")  # real HAM10000 dermoscopic images (two nevi, a melanoma)


def podman(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=system_deps.podman_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    return system_deps.container_image(IMAGE)


@pytest.fixture
def containers():
    """`run(*args)`: a detached container, `name()`: a name for one run otherwise, and `volume()`: a
    new named volume; all removed at the end of the test (rm -f -v -t0: no CNI chains and no anonymous
    /data volumes left behind)."""
    made: dict[str, list[str]] = {"containers": [], "volumes": []}

    class Containers:
        @staticmethod
        def name() -> str:
            """A new container name, removed at the end like the others."""
            made["containers"].append(f"dermsight-test-{uuid.uuid4().hex[:10]}")
            return made["containers"][-1]

        @staticmethod
        def run(*args: str) -> str:
            name = Containers.name()
            podman("run", "-d", "--name", name, *args)
            return name

        @staticmethod
        def volume() -> str:
            name = f"dermsight-test-{uuid.uuid4().hex[:10]}"
            podman("volume", "create", name)
            made["volumes"].append(name)
            return name

    yield Containers
    for name in made["containers"]:
        podman("rm", "-f", "-v", "-t0", name, check=False)
    for name in made["volumes"]:
        podman("volume", "rm", "-f", name, check=False)


def wait_ready(container: str, url: str) -> float:
    """Seconds until `url`/api/health answers 200; fails with the container's log when it stops
    or does not answer within READY_WITHIN."""
    started = time.monotonic()
    while time.monotonic() - started < READY_WITHIN:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if podman("inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true":
            break
        time.sleep(0.2)
    logs = podman("logs", container, check=False)
    pytest.fail(f"{container} not ready within {READY_WITHIN:g} s:\n{(logs.stdout + logs.stderr)[-3000:]}")


def create_key(image: str, *options: str) -> str:
    """A key from the image's own `dermsight keys create` (printed once, on stdout)."""
    created = podman("run", "--rm", *options, image, "keys", "create", "container test")
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def scans(shared, tmp_path_factory) -> Path:
    """A folder of real dermoscopic images (copies, in a temporary folder), readable by the
    container's user."""
    folder = tmp_path_factory.mktemp("scans")
    for image_id in SCANS:
        shutil.copy(shared / "ham10000" / "images" / f"{image_id}.jpg", folder)
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def local_risks(scans, tmp_path_factory) -> pd.Series:
    """melanoma_risk of each scan from `dermsight predict` on the host (the committed bundle,
    full precision)."""
    output = tmp_path_factory.mktemp("local") / "predictions.parquet"
    dermsight = Path(sys.executable).with_name("dermsight")
    subprocess.run([str(dermsight), "predict", str(scans), "-o", str(output), "--no-cache"], check=True,
                   capture_output=True)
    return pd.read_parquet(output).set_index("image")["melanoma_risk"]


def upload(url: str, key: str, path: Path, **form: str) -> dict:
    response = httpx.post(f"{url}/api/images", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          files=[("files", (path.name, path.read_bytes(), "image/jpeg"))], data=form)
    assert response.status_code == 201, response.text
    (prediction,) = response.json()["predictions"]
    return prediction


def test_serves_as_non_root_with_its_own_key_and_keeps_a_patient_across_a_restart(
    image, containers, scans, local_risks
):
    volume = containers.volume()
    keyless = podman("run", "--rm", "--name", containers.name(), "-v", f"{volume}:/data", image, check=False,
                     timeout=READY_WITHIN)  # a server that started anyway would never return
    assert keyless.returncode == 2 and "no active API key" in keyless.stderr, keyless.stderr

    key = create_key(image, "-v", f"{volume}:/data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = containers.run("-p", f"127.0.0.1:{port}:8000", "-v", f"{volume}:/data", image)
    print(f"ready {wait_ready(server, url):.1f} s after podman run")
    uids = [line.split()[1:] for line in podman("exec", server, "cat", "/proc/1/status").stdout.splitlines()
            if line.startswith("Uid:")]
    assert uids and "0" not in uids[0], uids  # the server (PID 1): real, effective, saved and fs uid
    assert podman("healthcheck", "run", server, check=False).returncode == 0

    assert httpx.get(f"{url}/api/patients", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    patient = httpx.post(f"{url}/api/patients", json={"reference": "container"}, headers=auth, timeout=10).json()
    melanoma = scans / f"{SCANS[2]}.jpg"
    prediction = upload(url, key, melanoma, patient_id=str(patient["id"]))
    assert prediction["melanoma_risk"] == pytest.approx(local_risks[SCANS[2]], abs=1e-5)

    podman("stop", "-t", "10", server)
    podman("start", server)
    wait_ready(server, url)
    detail = httpx.get(f"{url}/api/patients/{patient['id']}", headers=auth, timeout=10).json()
    (lesion,) = detail["lesions"]
    assert (detail["reference"], lesion["prediction"]["id"]) == ("container", prediction["id"])
    assert lesion["prediction"]["melanoma_risk"] == prediction["melanoma_risk"]


def test_stores_in_postgresql_when_told_to(image, containers, new_database, scans, local_risks, tmp_path):
    database_url = new_database("postgresql", tmp_path)  # the tests' throwaway cluster, on the host's loopback
    options = ("--network=host", "-e", f"DERMSIGHT_DATABASE_URL={database_url}")
    key = create_key(image, *options)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = containers.run(*options, image, "serve", "--host", "127.0.0.1", "--port", str(port))
    wait_ready(server, url)
    prediction = upload(url, key, scans / f"{SCANS[0]}.jpg")

    storage = Storage(database_url, tmp_path / "files")
    stored = storage.get_prediction(prediction["id"])
    storage.engine.dispose()
    assert stored.melanoma_risk == pytest.approx(local_risks[SCANS[0]], abs=1e-5)
    assert "dermsight.db" not in podman("exec", server, "ls", "/data").stdout


def test_predict_scores_a_read_only_folder(image, scans, local_risks, tmp_path):
    tmp_path.chmod(0o777)  # the container's user writes the predictions here
    podman("run", "--rm", "-v", f"{scans}:/scans:ro", "-v", f"{tmp_path}:/out", image,
           "predict", "/scans", "-o", "/out/predictions.parquet")
    inside = pd.read_parquet(tmp_path / "predictions.parquet").set_index("image")["melanoma_risk"]
    assert sorted(inside.index) == sorted(SCANS)
    assert inside[list(SCANS)].to_numpy() == pytest.approx(local_risks[list(SCANS)].to_numpy(), abs=1e-5)


@pytest.mark.parametrize("ci", ["true", None])
def test_without_podman_the_tests_skip_outside_ci_and_fail_in_it(tmp_path, monkeypatch, ci):
    """scripts/container.sh with none of podman, runc and debootstrap on PATH and an apt-get whose
    install fails (nothing is installed for real): a skip with the script's warning, or in CI a failure."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for program in ("bash", "dirname", "awk", "id"):  # all the script needs before podman
        (tools / program).symlink_to(shutil.which(program))
    apt_get = tmp_path / "apt-get"
    apt_get.write_text('#!/bin/sh\n[ "$1" = update ] || exit 100\n')
    apt_get.chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setenv("APT_GET", str(apt_get))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="warning: podman runc debootstrap not installed"):
            system_deps.container_image(IMAGE)
    else:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="error: CI=true and podman runc debootstrap not installed"):
            system_deps.container_image(IMAGE)
