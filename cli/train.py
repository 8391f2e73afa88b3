"""`ampo-train`: the online AMPO trainer's command line."""

import typer

app = typer.Typer(help="Train a student with AMPO (GRPO + guidance on demand from the trace store).",
                  add_completion=False)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context):
    """The trainer's commands (`run`, `eval`) are being built; this entry point reserves the name."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


if __name__ == "__main__":
    app()
