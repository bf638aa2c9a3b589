"""The `msabank` command line (typer + rich): parse, call, render."""
