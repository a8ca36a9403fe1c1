# DermSight's serving image: `dermsight serve` (the web app and API) and `dermsight predict`
# (batch scoring), on ONNX Runtime: no torch, no training or test extras. Build and run:
# README "Run it as a container"; scripts/container.sh builds it with podman.
# Build with `--format docker` (podman/buildah) so that the HEALTHCHECK is kept.

FROM debian:bookworm-slim AS base
# Debian bookworm's Python 3.11, the interpreter the project pins (requires-python).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

# The base dependencies of pyproject.toml but those only `dermsight evaluate` and `train` import
# (isic-challenge-scoring; scikit-learn, and SciPy with it): tests/test_container.py runs serve and
# predict on the image. The pip layer below is reused until this list changes (edits elsewhere in
# pyproject.toml leave the file, and so podman's layer cache, as it is).
FROM base AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import re, tomllib; project = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
      left_out = {"isic-challenge-scoring", "scikit-learn"}; \
      print(*(d for d in project["dependencies"] if re.split("[=<>!~\\[ ;]", d)[0] not in left_out), sep="\n")' \
    > /tmp/requirements.txt

FROM base AS dependencies
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
# pip and setuptools leave the venv once it is filled, and the libraries' own test suites with
# them. CA_BUNDLE: a CA bundle for pip where a proxy signs PyPI's certificate (scripts/container.sh
# mounts this machine's); unset, pip uses Debian's.
ARG CA_BUNDLE
RUN if [ -n "$CA_BUNDLE" ]; then export PIP_CERT="$CA_BUNDLE"; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && find /opt/venv/lib/python3.11/site-packages -depth -type d -name tests -path '*/site-packages/*/tests' \
      -exec rm -rf {} +

# The image itself grows on the venv's stage rather than copying /opt/venv into a fresh base: that
# would save ~6 MB (python3-venv, ca-certificates) but cost every rebuild ~15 s of hashing 570 MB.
FROM dependencies
RUN rm /tmp/requirements.txt \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/dermsight \
      --shell /usr/sbin/nologin dermsight \
 && mkdir /data && chown dermsight:dermsight /data
# The repository's layout: the default bundle is found beside src/ (dermsight.models.bundle).
COPY bundles/default /app/bundles/default
COPY src /app/src
# `dermsight` is the project's console script (dermsight.cli:app) on the source above.
RUN echo /app/src > /opt/venv/lib/python3.11/site-packages/dermsight.pth \
 && printf '#!/opt/venv/bin/python\nimport sys\nfrom dermsight.cli import app\nsys.exit(app())\n' \
      > /opt/venv/bin/dermsight \
 && chmod 755 /opt/venv/bin/dermsight \
 && /opt/venv/bin/python -m compileall -q /app/src
# Configuration at run time (-e): DERMSIGHT_DATABASE_URL (PostgreSQL instead of SQLite in /data) and
# DERMSIGHT_SITE (a site profile from `dermsight calibrate`); both are read by dermsight itself.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DERMSIGHT_DATA_DIR=/data
USER dermsight
WORKDIR /data
# Load the model once, here: the ONNX graph's load-time rewrite is cached in the user's
# ~/.cache/dermsight (every start skips it), and the build fails if the model needs torch.
RUN python -c 'from dermsight.inference.predictor import Predictor; Predictor()'
# Images, heat maps and the SQLite database (unless DERMSIGHT_DATABASE_URL names another database).
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4)"]
# Production mode: API keys required (`dermsight keys create NAME` on the same volume or database
# first: without an active key serve refuses to start), rate limits on.
ENTRYPOINT ["dermsight"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
