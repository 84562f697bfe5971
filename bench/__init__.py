"""The benchmarks: scripts that print figures, run from the repository root as
`python -m bench.<script>` (README.md here lists them); shared helpers in `common.py`,
`scan_load.py` and `fake_engine.py`."""
