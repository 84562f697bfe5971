from scanner_gateway.cli import app

app()
