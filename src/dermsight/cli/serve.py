"""`dermsight serve`: the web app and JSON API."""

from __future__ import annotations

from pathlib import Path

import typer

from dermsight.cli.common import MODEL_HELP, SITE_HELP, console, fail


def register(app: typer.Typer) -> None:
    """Add `dermsight serve` to `app`."""
    app.command("serve")(serve_command)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; put TLS in front)."),
    port: int = typer.Option(8000, min=1, max=65535),
    model: Path = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    data_dir: Path = typer.Option(
        None, "--data-dir",
        help="Where images, heat maps and the SQLite database go (default: $DERMSIGHT_DATA_DIR or ./.dermsight).",
    ),
    dev: bool = typer.Option(False, "--dev", help="No API keys (and no rate limits): only on a loopback address."),
    cors_origin: list[str] = typer.Option(
        None, "--cors-origin", help="Let pages of this origin (https://host[:port]) call the API; repeatable. Default: none."
    ),
    rate_limit: float = typer.Option(20.0, min=0.1, help="Requests a second per API key (token bucket rate)."),
    burst: int = typer.Option(120, min=1, help="Requests per API key allowed in a burst (token bucket size)."),
    max_active: int = typer.Option(2, min=1, help="Uploads or re-scorings run at once."),
    max_queue: int = typer.Option(16, min=0, help="Uploads waiting for a slot; beyond that: 503 + Retry-After."),
    max_connections: int = typer.Option(128, min=1, help="Open connections; beyond that uvicorn answers 503."),
    log_level: str = typer.Option("info", help="debug, info, warning or error (no request bodies are ever logged)."),
    forwarded_allow_ips: str = typer.Option(
        None, "--forwarded-allow-ips",
        help="Trust X-Forwarded-For/-Proto only from these proxy addresses (comma-separated; default: from nobody).",
    ),
    site: Path = typer.Option(None, "--site", envvar="DERMSIGHT_SITE", help=SITE_HELP + " Default: $DERMSIGHT_SITE."),
) -> None:
    """The web app and JSON API (docs at /docs). PostgreSQL instead of SQLite: set DERMSIGHT_DATABASE_URL.

    Needs an API key (`dermsight keys create NAME --role ROLE`) for everything but /learn and
    /api/health, unless --dev; without an active one it refuses to start."""
    import uvicorn

    from dermsight.models.bundle import BundleError
    from dermsight.models.site_profile import SiteProfileError
    from dermsight.serving.app import create_app
    from dermsight.serving.limits import Settings
    from dermsight.serving.logs import configure_logging, log_config

    if dev and host not in LOOPBACK:
        fail(f"--dev serves without API keys: only on {', '.join(LOOPBACK)}, not {host}", 2)
    configure_logging(log_level)
    settings = Settings(dev=dev, rate=rate_limit, burst=burst, max_active=max_active, max_queue=max_queue,
                        cors_origins=tuple(cors_origin or ()))
    try:
        web_app = create_app(model, storage_dir=data_dir, settings=settings, site=site)
    except (BundleError, SiteProfileError) as err:
        fail(err)
    if dev:
        console.print("[yellow]dev mode: no API keys needed[/] (loopback only)")
    elif not any(key.revoked_at is None for key in web_app.state.scorer.storage.list_api_keys()):
        fail("no active API key, so nobody could use this server (production mode needs one); create one with "
             "`dermsight keys create NAME --role admin` (same --data-dir and DERMSIGHT_DATABASE_URL) and start "
             "again, or serve with --dev on a loopback address", 2)
    console.print(f"operating point: {web_app.state.operating_point}", highlight=False, soft_wrap=True)
    console.print(f"DermSight on http://{host}:{port}  (API docs: /docs)", highlight=False)
    uvicorn.run(
        web_app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
        limit_concurrency=max_connections, proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=forwarded_allow_ips or None,
        timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False,
    )
