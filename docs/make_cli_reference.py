"""Regenerate docs/cli.md from the commands' own --help (run: python docs/make_cli_reference.py)."""

from pathlib import Path

from click.testing import CliRunner

from onlinemf.cli import main

COMMANDS = ["fit", "update", "project", "info", "evaluate"]


def render() -> str:
    runner = CliRunner()
    parts = [
        "# CLI reference",
        "",
        "Generated from `onlinemf COMMAND --help` by `docs/make_cli_reference.py`; defaults are shown in brackets.",
        "User errors print one line `Error: ...` on stderr and exit with status 1; usage errors exit 2;",
        "an interrupt (Ctrl-C) exits 130 and leaves no partial output.",
        "",
        "```text",
        runner.invoke(main, ["--help"], prog_name="onlinemf", terminal_width=110).output.rstrip(),
        "```",
    ]
    for cmd in COMMANDS:
        out = runner.invoke(main, [cmd, "--help"], prog_name="onlinemf", terminal_width=110).output.rstrip()
        parts += ["", f"## onlinemf {cmd}", "", "```text", out, "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("cli.md")
    path.write_text(render())
    print(f"wrote {path}")
