"""One module per noun; each defines a typer app or plain commands."""
