"""docs/cli.md is the `fastnet` command's own help (tools/cli_reference.py writes it from the parsers),
so the documentation of the command line and its --help cannot disagree."""

import importlib.util
from pathlib import Path

import pytest

from fastnet.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()
EVERY_COMMAND = list(generator.parsers(build_parser()))


def test_docs_cli_md_is_what_the_parsers_print():
    page = generator.OUTPUT.read_text(encoding="utf-8") if generator.OUTPUT.exists() else ""
    expected = generator.reference()
    if page != expected:
        # The first line that differs, rather than pytest's diff of two 700-line pages.
        found, wanted = page.splitlines(), expected.splitlines()
        pairs = enumerate(zip(found, wanted, strict=False))
        line = next((i for i, (a, b) in pairs if a != b), min(len(found), len(wanted)))
        pytest.fail(f"docs/cli.md is not what the help in fastnet/cli/ says (from line {line + 1}: "
                    f"{found[line] if line < len(found) else '<end>'!r} instead of "
                    f"{wanted[line] if line < len(wanted) else '<end>'!r}): run python tools/cli_reference.py "
                    f"and commit docs/cli.md")


def test_the_page_is_the_same_whatever_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = generator.reference()
    monkeypatch.setenv("COLUMNS", "250")
    assert generator.reference() == narrow
    assert generator.os.environ["COLUMNS"] == "250"  # the generator leaves the caller's width as it was


def test_every_command_carries_its_reference_and_the_page_has_each():
    page = generator.reference()
    names = [parser.prog for parser in EVERY_COMMAND]
    assert {"fastnet", "fastnet train", "fastnet evaluate", "fastnet predict", "fastnet plot", "fastnet runs",
            "fastnet bench", "fastnet plan", "fastnet sweep", "fastnet data download"} <= set(names)
    for parser in EVERY_COMMAND:
        assert parser.description and parser.epilog, f"{parser.prog} has no reference: give it an epilog"
        assert f"\n## {parser.prog}\n" in page
        assert parser.epilog in page, f"{parser.prog}'s epilog is not printed as written"


@pytest.mark.parametrize("parser", EVERY_COMMAND, ids=[parser.prog for parser in EVERY_COMMAND])
def test_a_reference_fits_a_terminal_of_80_columns(parser):
    # The epilogs and descriptions are printed as written (RawDescriptionHelpFormatter): argparse does
    # not wrap them, so their lines must be short enough already.
    for text in (parser.description, parser.epilog):
        too_long = [line for line in text.splitlines() if len(line) > 79]
        assert not too_long, f"{parser.prog}: lines over 79 characters: {too_long}"


def test_the_reference_of_train_names_the_files_of_a_run_folder_and_how_to_resume():
    train = next(parser for parser in EVERY_COMMAND if parser.prog == "fastnet train")
    for needed in ("config.json", "metrics.jsonl", "model.npz", "checkpoint.npz", "--resume RUN_DIR",
                   "Divergence", "--whiten", "--tta flip", "--flip", "exit status"):
        assert needed in train.epilog, needed
