"""`scanner-gateway` command line: up, serve, make-dev-model, tasks."""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from scanner_gateway import __version__
from scanner_gateway.batch_cli import batch_app
from scanner_gateway.client import DEFAULT_URL, AsyncScanClient, ScanError
from scanner_gateway.client.bulk import (
    IMAGE_SUFFIXES,
    BulkSummary,
    ResultsFile,
    find_images,
    scan_all,
)
from scanner_gateway.config import Settings, settings_problems
from scanner_gateway.engine.launcher import (
    DEFAULT_ENGINE_PORT,
    DEFAULT_SERVED_NAME,
    DEV_SERVED_NAME,
    EngineOptions,
    EngineStartError,
    ManagedEngine,
    engine_command,
    engine_env,
    port_taken,
    refuse_media_policy_flags,
    vllm_executable,
)
from scanner_gateway.scan.tasks import TaskConfigError, TaskRegistry
from scanner_gateway.serving import run_gateway

app = typer.Typer(help="Retail-vision scan gateway in front of vLLM.", no_args_is_help=True)
console = Console(stderr=True)
app.add_typer(batch_app, name="batch")

# The dev model's context: its largest prompt (4 images x 1200 tokens) plus a retried answer.
DEV_MAX_MODEL_LEN = 20480
# The CPU dev engine's knee: its throughput stops growing past 4-8 requests at once
# (bench/results/compare-cpu.md); more wait inside vLLM, where admission sees them queue.
DEV_MAX_NUM_SEQS = 8
# `up` stops within 10 s of SIGTERM: `docker stop`'s default grace, the shortest of the
# usual supervisors' (Kubernetes 30 s, systemd 90 s). Its parts, unless the operator set
# them: no drain (one `up` box sits behind no balancer that would read its /ready),
# in-flight requests get 2 s, then the engine 3 s before SIGKILL. The 5 s left over are
# for the stalls a CPU engine still generating causes (timers ran 5 s late on 2 cores,
# and 4 s for requests then took `up` 10.2 s to stop).
UP_STOP_BOUND_S = 10.0
UP_STOP_DEFAULTS = {"drain_s": 0.0, "graceful_timeout_s": 2.0}
UP_ENGINE_STOP_GRACE_S = 3.0


def _print_version(value: bool) -> None:
    if value:
        print(f"scanner-gateway {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Retail-vision scan gateway in front of vLLM."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scanner-gateway"
    return Path(os.environ.get("SCANNER_CACHE_DIR", default))


def _load_registry(settings: Settings) -> TaskRegistry:
    try:
        return TaskRegistry.load(settings.prompts_dir)
    except TaskConfigError as exc:
        console.print(f"[red]bad task file:[/red] {exc}")
        raise typer.Exit(2) from exc


def _run_gateway(settings: Settings, workers: int = 1) -> None:
    _load_registry(settings)  # fail with a clear message before uvicorn starts
    run_gateway(settings, workers)


def ensure_dev_model(directory: Path) -> Path:
    from scanner_gateway.engine.devmodel import build_dev_model, is_model_dir

    if not is_model_dir(directory):
        console.print(f"building the dev model in {directory} ...")
        build_dev_model(directory)
    return directory


def _engine_options(
    settings: Settings, model: str | None, host: str, port: int, max_model_len: int | None,
    engine_arg: list[str] | None,
) -> EngineOptions:
    """vLLM options sized for our task files; the dev model (built on first use) by default."""
    try:
        refuse_media_policy_flags(engine_arg or [])
    except EngineStartError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    registry = _load_registry(settings)
    if model is None:
        model_path = str(ensure_dev_model(cache_dir() / "dev-model"))
        served, max_len, max_seqs = DEV_SERVED_NAME, max_model_len or DEV_MAX_MODEL_LEN, DEV_MAX_NUM_SEQS
    else:
        model_path, served, max_len, max_seqs = model, DEFAULT_SERVED_NAME, max_model_len, None
    return EngineOptions(
        model=model_path,
        served_model_name=served,
        host=host,
        port=port,
        max_images=registry.most_images(),
        max_image_pixels=max(t.spec.pixel_budget.max_pixels for t in registry),
        max_model_len=max_len,
        max_num_seqs=max_seqs,
        api_key=settings.upstream_api_key,
        extra_args=engine_arg or [],
    )


@app.command()
def engine(
    model: Annotated[
        Optional[str], typer.Option(help="Model directory or hub id. Default: the tiny dev model.")
    ] = None,
    host: Annotated[str, typer.Option(help="vLLM bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="vLLM port.")] = DEFAULT_ENGINE_PORT,
    max_model_len: Annotated[Optional[int], typer.Option(help="vLLM --max-model-len.")] = None,
    engine_arg: Annotated[Optional[list[str]], typer.Option(help="Extra argument for `vllm serve` (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the command instead of running it.")] = False,
) -> None:
    """Run only vLLM, in the foreground, with the flags the gateway relies on (containers)."""
    opts = _engine_options(_settings(), model, host, port, max_model_len, engine_arg)
    try:
        executable = "vllm" if dry_run else vllm_executable()
    except EngineStartError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    cmd = engine_command(opts, executable)
    if dry_run:
        typer.echo(shlex.join(cmd))
        return
    os.execvpe(executable, cmd, engine_env(opts.model))


@app.command()
def up(
    model: Annotated[
        Optional[str],
        typer.Option(help="Model directory or hub id (e.g. Ostrakon/Ostrakon-VL-8B on a GPU box). "
                     "Default: the tiny random-weight dev model, built on first use."),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Gateway bind address (default SCANNER_HOST or 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Gateway port (default SCANNER_PORT or 8080).")] = None,
    engine_port: Annotated[int, typer.Option(help="Port of the managed vLLM server.")] = DEFAULT_ENGINE_PORT,
    max_model_len: Annotated[Optional[int], typer.Option(help="vLLM --max-model-len.")] = None,
    engine_arg: Annotated[
        Optional[list[str]],
        typer.Option(help="Extra argument for `vllm serve` (repeatable), e.g. --engine-arg=--tensor-parallel-size=2"),
    ] = None,
) -> None:
    """Start vLLM (managed child) and the gateway in front of it; Ctrl-C stops both."""
    # SIGTERM must unwind through `with engine:` so the child is stopped, never orphaned
    # (uvicorn re-raises the signal it caught once it has shut down).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = _settings(**overrides)
    overrides.update({k: v for k, v in UP_STOP_DEFAULTS.items() if k not in settings.model_fields_set})
    # The engine answers only the gateway: a key of this run's own unless one is set.
    overrides["upstream_api_key"] = settings.upstream_api_key or secrets.token_urlsafe(24)
    settings = _settings(**overrides)
    host, port = settings.host, settings.port
    _refuse_taken_ports(host, port, engine_port)
    opts = _engine_options(settings, model, "127.0.0.1", engine_port, max_model_len, engine_arg)
    model_path, served = opts.model, opts.served_model_name
    log_path = cache_dir() / "logs" / f"vllm-{engine_port}.log"
    try:
        engine = ManagedEngine(opts, log_path, stop_grace_s=UP_ENGINE_STOP_GRACE_S)
    except EngineStartError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"starting vLLM on {opts.base_url} (model {model_path}); log: {log_path}")
    with engine:
        try:
            with console.status("waiting for the engine's /health ...") as status:
                engine.wait_healthy(on_wait=lambda s: status.update(f"waiting for the engine's /health ... {s:.0f} s"))
        except EngineStartError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        console.print(
            f"[green]engine ready[/green]. Gateway: http://{host}:{port}  "
            f"(docs http://{host}:{port}/docs, tasks http://{host}:{port}/v1/tasks)"
        )
        settings = _settings(**overrides, upstream_url=opts.base_url, model=served)
        try:
            _run_gateway(settings)
        except KeyboardInterrupt:
            pass
        console.print("stopping the engine ...")
    console.print("engine stopped")


def _refuse_taken_ports(host: str, port: int, engine_port: int) -> None:
    """Say so before the engine's minute of startup: a busy engine port would even let
    another server's /health pass for ours."""
    if port_taken("127.0.0.1", engine_port):
        console.print(f"[red]port {engine_port} (the engine's) is already in use[/red]: another vLLM? "
                      f"Put a gateway in front of it with `scanner-gateway serve --upstream "
                      f"http://127.0.0.1:{engine_port}`, or pick a free port with --engine-port.")
        raise typer.Exit(1)
    if port_taken(host, port):
        console.print(f"[red]port {port} (the gateway's) is already in use on {host}[/red]: "
                      "another gateway? Pick a free port with --port (or SCANNER_PORT).")
        raise typer.Exit(1)


def _settings(**overrides: Any) -> Settings:
    """Settings from SCANNER_* (and .env) plus the command's flags; a bad value stops
    the command with one line per problem, not a traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        console.print("[red]invalid settings:[/red]")
        for line in settings_problems(exc):
            console.print(f"  {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


@app.command()
def serve(
    upstream: Annotated[
        Optional[str], typer.Option(help="vLLM base URL (default: SCANNER_UPSTREAM_URL or http://127.0.0.1:8000).")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default SCANNER_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default SCANNER_PORT or 8080).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run only the gateway, in front of an existing vLLM server."""
    overrides = {k: v for k, v in {"upstream_url": upstream, "host": host, "port": port}.items() if v is not None}
    _run_gateway(_settings(**overrides), workers=workers)


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="Photos and/or folders (searched recursively).")],
    task: Annotated[str, typer.Option(help="Scan task (see `scanner-gateway tasks`).")] = "product_scan",
    url: Annotated[str, typer.Option(help="Gateway base URL.")] = DEFAULT_URL,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="SCANNER_API_KEY", help="Bearer key (or SCANNER_API_KEY).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Scans in flight at once.")] = 4,
    out: Annotated[Path, typer.Option(help="Results file: .jsonl or .csv (appended; reruns resume).")] = Path(
        "results.jsonl"
    ),
    locale: Annotated[Optional[str], typer.Option(help="Prompt language: zh or en.")] = None,
    priority: Annotated[str, typer.Option(help="interactive or batch.")] = "batch",
    retry_failed: Annotated[bool, typer.Option(help="Scan images whose last row failed again.")] = False,
) -> None:
    """Scan files and folders concurrently; one row per image; exit 1 if any failed.

    A failure recorded by an earlier run and skipped now still counts: the output is not
    complete until every photo has a result, so a nightly job's `&&` does not go on.
    """
    try:
        results = ResultsFile(out)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    images, missing = find_images(paths)
    for path in missing:
        console.print(f"[yellow]not found:[/yellow] {path}")
    if not images:
        console.print(f"[red]no photos found[/red] ({', '.join(sorted(IMAGE_SUFFIXES))})")
        raise typer.Exit(2)

    async def run() -> BulkSummary:
        async with AsyncScanClient(url, api_key=api_key, priority=priority, max_connections=concurrency) as client:
            await _check_gateway(client, url, task)
            with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console) as progress:
                bar = progress.add_task(f"{task}", total=len(images))

                def done(_path: Path, _status: str) -> None:
                    written[0] += 1
                    progress.advance(bar)

                summary = await scan_all(
                    client, images, task, results, concurrency=concurrency, locale=locale,
                    retry_failed=retry_failed, on_done=done,
                )
                progress.update(bar, completed=len(images))
                return summary

    written = [0]  # rows this run wrote, for the message if it is interrupted
    try:
        summary = asyncio.run(run())
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: {written[0]} row(s) written to {out} in this run; "
                      "run the same command again to resume[/yellow]")
        raise typer.Exit(130) from None
    if summary.torn_bytes:
        console.print(f"[yellow]cut a half-written last row ({summary.torn_bytes} bytes) left in {out} "
                      "by an interrupted run; its photo was scanned again[/yellow]")
    already = f"{summary.skipped} already in {out}"
    if summary.skipped_failed:
        already += f" ({summary.skipped_failed} of them failed then; --retry-failed scans them again)"
    console.print(f"{len(images)} photo(s): {summary.scanned['ok']} scanned, {summary.failed} failed, {already}")
    if summary.failed or summary.skipped_failed or missing:
        raise typer.Exit(1)


async def _check_gateway(client: AsyncScanClient, url: str, task: str) -> None:
    """Stop before the first photo (and before writing a row) when no scan could work."""
    try:
        names = [t["name"] for t in await client.tasks()]
    except ScanError as exc:
        hint = " (pass --api-key or set SCANNER_API_KEY)" if exc.status == 401 else ""
        console.print(f"[red]cannot use the gateway at {url}:[/red] {exc.message}{hint}")
        raise typer.Exit(2) from exc
    if task not in names:
        console.print(f"[red]unknown task {task!r}[/red]; the gateway offers: {', '.join(names)}")
        raise typer.Exit(2)


@app.command("make-dev-model")
def make_dev_model(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 1234,
    preset: Annotated[
        str,
        typer.Option(help="tiny (the dev model) or qwen3-vl-8b (8B shapes, no weights: "
                     "for `vllm serve --load-format dummy` on a GPU)."),
    ] = "tiny",
) -> None:
    """Write the tiny random-weight Qwen3-VL dev model, or the 8B shapes alone (no download)."""
    from scanner_gateway.engine.devmodel import PRESETS, build_dev_model

    if preset not in PRESETS:
        raise typer.BadParameter(f"one of {', '.join(PRESETS)}", param_hint="--preset")
    try:
        out = build_dev_model(directory, seed=seed, preset=preset)
    except ImportError as exc:
        console.print(f"[red]needs torch and transformers (pip install '.[engine-cpu]'): {exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"dev model written to {out}")


@app.command("sample-photo")
def sample_photo(
    path: Annotated[Path, typer.Argument(help="Output JPEG, e.g. shelf.jpg.")],
    width: Annotated[int, typer.Option(min=32, max=12000)] = 4000,
    height: Annotated[int, typer.Option(min=32, max=12000)] = 3000,
    seed: Annotated[int, typer.Option(help="Different seeds give different shelves.")] = 0,
) -> None:
    """Write a synthetic shelf photo (labelled boxes, price tags) to try the API with."""
    from scanner_gateway.synthetic import shelf_jpeg

    path.write_bytes(shelf_jpeg(width, height, seed=seed))
    console.print(f"wrote {path} ({width}x{height})")


@app.command()
def tasks(
    prompts_dir: Annotated[Optional[Path], typer.Option(help="Task directory (default SCANNER_PROMPTS_DIR).")] = None,
) -> None:
    """Validate the task files and list them."""
    settings = _settings(**({"prompts_dir": prompts_dir} if prompts_dir else {}))
    for task in _load_registry(settings):
        s = task.spec
        typer.echo(
            f"{s.name:20} v{s.version}  images<={s.max_images}  pixels<={s.pixel_budget.max_pixels}  "
            f"max_tokens={s.sampling.max_tokens}  {s.description}"
        )


if __name__ == "__main__":
    app()
