"""The documentation stays true to the code: every CLI option is in docs/cli.md, every slot in docs/outputs.md."""

from pathlib import Path

import click

from onlinemf import _keys
from onlinemf.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_lists_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    for name, command in main.commands.items():
        assert f"## onlinemf {name}" in text
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(opt in text for opt in param.opts), f"{name}: {param.opts} missing from docs/cli.md"


def test_outputs_doc_names_every_slot():
    text = (DOCS / "outputs.md").read_text()
    for key in (_keys.OBSM_H, _keys.OBSM_H_NORM, _keys.OBSM_UMAP, _keys.OBS_CLUSTER, _keys.OBS_DATASET, _keys.VARM_W,
                _keys.VAR_SELECTED, _keys.UNS):
        assert key in text, f"{key} missing from docs/outputs.md"


def test_outputs_doc_names_every_tl_slot():
    text = (DOCS / "outputs.md").read_text()
    for attr, key in _keys.slots("<key>").items():
        assert f"`{attr}['{key}']`" in text, f"tl.integrate slot {attr}['{key}'] missing from docs/outputs.md"


def test_cli_reference_is_the_current_help():
    """docs/cli.md is generated from the commands' --help; regenerate it with `python docs/make_cli_reference.py`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_cli_reference", DOCS / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.render(), "docs/cli.md is stale: run python docs/make_cli_reference.py"
