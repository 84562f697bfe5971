"""`scanner-gateway batch submit|status|download`: nightly audits run on the gateway, not
on the auditor's laptop. Submit returns once the batch is stored (the laptop may close);
`--wait` follows it with a progress bar and downloads the answers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from scanner_gateway.client import DEFAULT_URL, ScanError
from scanner_gateway.client.batch_client import BatchClient, write_scan_batch

batch_app = typer.Typer(help="Batch jobs on the gateway (OpenAI's Batch API): submit, status, download.",
                        no_args_is_help=True)
console = Console(stderr=True)
Url = Annotated[str, typer.Option(help="Gateway base URL.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="SCANNER_API_KEY", help="Bearer key (or SCANNER_API_KEY).")]


def _fail(exc: ScanError, what: str) -> typer.Exit:
    hint = " (pass --api-key or set SCANNER_API_KEY)" if exc.status == 401 else ""
    console.print(f"[red]{what}:[/red] {exc.message}{hint}")
    return typer.Exit(2)


def _summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    return (f"{batch['id']}: {batch['status']}, {counts['completed']} done, {counts['failed']} failed "
            f"of {counts['total']}")


@batch_app.command()
def submit(
    sources: Annotated[list[str], typer.Argument(help="Photos, folders (searched recursively) and/or photo URLs.")],
    task: Annotated[str, typer.Option(help="Scan task (see `scanner-gateway tasks`).")] = "product_scan",
    urls: Annotated[Optional[Path], typer.Option(help="A file of photo URLs, one per line, added to SOURCES.")] = None,
    locale: Annotated[Optional[str], typer.Option(help="Prompt language: zh or en.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    wait: Annotated[bool, typer.Option(help="Follow the batch to its end, then download its answers.")] = False,
    out: Annotated[Path, typer.Option(help="With --wait: folder for output.jsonl and errors.jsonl.")] = Path("."),
) -> None:
    """Build a scan batch from photos or URLs, upload it, start it; print its id."""
    listed = [line.strip() for line in urls.read_text().splitlines() if line.strip()] if urls else []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.jsonl"
        lines, missing = write_scan_batch([*sources, *listed], task, batch_file, locale)
        for path in missing:
            console.print(f"[yellow]not found:[/yellow] {path}")
        if not lines:
            console.print("[red]no photos or URLs to scan[/red]")
            raise typer.Exit(2)
        with BatchClient(url, api_key) as client:
            try:
                batch = client.submit(batch_file)
            except ScanError as exc:
                raise _fail(exc, f"cannot submit {lines} scan(s) to {url}") from exc
    typer.echo(batch["id"])
    console.print(_summary(batch))
    if wait:
        _follow(url, api_key, batch["id"], out)


@batch_app.command()
def status(batch_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Print a batch's status and counts."""
    with BatchClient(url, api_key) as client:
        try:
            console.print(_summary(client.retrieve(batch_id)))
        except ScanError as exc:
            raise _fail(exc, f"cannot read batch {batch_id}") from exc


@batch_app.command()
def download(
    batch_id: str,
    out: Annotated[Path, typer.Option(help="Folder for output.jsonl and errors.jsonl.")] = Path("."),
    wait: Annotated[bool, typer.Option(help="Wait for the batch to finish first.")] = True,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a finished batch's answers (output.jsonl) and failures (errors.jsonl); exit 1 if any failed."""
    if wait:
        _follow(url, api_key, batch_id, out)
    else:
        _download(url, api_key, batch_id, out)


def _follow(url: str, api_key: str | None, batch_id: str, out: Path) -> None:
    with BatchClient(url, api_key) as client, \
            Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console) as progress:
        bar = progress.add_task(batch_id, total=None)

        def update(batch: dict[str, Any]) -> None:
            counts = batch["request_counts"]
            progress.update(bar, total=counts["total"], completed=counts["completed"] + counts["failed"],
                            description=f"{batch_id[:18]} {batch['status']}")

        try:
            client.wait(batch_id, update)
        except ScanError as exc:
            raise _fail(exc, f"cannot follow batch {batch_id}") from exc
    _download(url, api_key, batch_id, out)


def _download(url: str, api_key: str | None, batch_id: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with BatchClient(url, api_key) as client:
        try:
            batch = client.retrieve(batch_id)
            if batch["status"] not in ("completed", "expired", "cancelled"):
                console.print(f"[yellow]{_summary(batch)}[/yellow]: its files are written when it ends")
                raise typer.Exit(2)
            for file_id, name in ((batch["output_file_id"], "output.jsonl"), (batch["error_file_id"], "errors.jsonl")):
                if file_id:
                    size = client.download(file_id, out / name)
                    console.print(f"{out / name}: {size} bytes")
        except ScanError as exc:
            raise _fail(exc, f"cannot download batch {batch_id}") from exc
    console.print(_summary(batch))
    if batch["request_counts"]["failed"]:
        raise typer.Exit(1)
