from PIL import Image
from typer.testing import CliRunner

from scanner_gateway.cli import app

runner = CliRunner()


def test_tasks_lists_the_five_and_rejects_a_bad_dir(tmp_path):
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0
    assert sum(name in result.output for name in ("product_scan", "shelf_audit", "price_tags",
                                                   "storefront", "kitchen_compliance")) == 5
    (tmp_path / "bad.yaml").write_text("name: bad\n")
    result = runner.invoke(app, ["tasks", "--prompts-dir", str(tmp_path)])
    assert result.exit_code == 2


def test_sample_photo(tmp_path):
    path = tmp_path / "shelf.jpg"
    result = runner.invoke(app, ["sample-photo", str(path), "--width", "640", "--height", "480"])
    assert result.exit_code == 0
    assert Image.open(path).size == (640, 480)


def test_engine_command_prints_the_flags_the_gateway_relies_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANNER_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["engine", "--dry-run", "--host", "0.0.0.0", "--model", "/models/ostrakon"])
    assert result.exit_code == 0, result.output
    cmd = result.output.strip()
    assert cmd.startswith("vllm serve /models/ostrakon --served-model-name ostrakon-vl --host 0.0.0.0")
    for flag in ("--scheduling-policy priority", "--generation-config vllm", '"backend":"guidance"',
                 "--limit-mm-per-prompt"):
        assert flag in cmd


def test_version():
    from scanner_gateway import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"scanner-gateway {__version__}\n"
