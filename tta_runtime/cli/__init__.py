"""The `tta-runtime` command line: `main.py` holds the command table, one module per command group, `common.py`
the options, output and errors they share."""
