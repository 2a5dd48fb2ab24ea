"""Every code block of README.md and docs/*.md runs, or is checked against the code, so that an example
cannot drift from what fastnet does:

- python: run, block after block of one file in one namespace, in an empty folder, with FASTNET_DATA
  holding a tiny CIFAR-10-shaped dataset;
- bash: every fastnet command line is parsed by fastnet's own parser, and a `fastnet train` line's
  settings are checked as a run checks them (a recipe that trains for minutes is not run); an extra
  named in `pip install` exists in pyproject.toml; a script, test path or tool named exists;
- toml: a sweep's search space, loaded as `fastnet sweep --space` loads it;
- text: output a reader will see, not run.
"""

import pathlib
import re
import shlex

import numpy as np
import pytest

from fastnet import backends, cli
from fastnet.errors import FastnetError
from fastnet.sweep import space

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "toml", "text"}
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def blocks(page, language=None):
    """(language, code, line number of the fence) of every fenced block in `page`."""
    text = page.read_text()
    found = [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]
    return [b for b in found if language is None or b[0] == language]


def shell_lines(page):
    """(line number, words) of every command in the page's bash blocks: continuations joined,
    comments dropped, leading VAR=value assignments dropped."""
    lines = []
    for _, code, start in blocks(page, "bash"):
        joined = code.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines(), start + 1):
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words:
                lines.append((offset, words))
    return lines


def name(page):
    return str(page.relative_to(ROOT))


def test_every_block_is_in_a_language_the_tests_run():
    for page in PAGES:
        for language, _, line in blocks(page):
            assert language in LANGUAGES, f"{name(page)}:{line}: a ```{language} block: use one of {sorted(LANGUAGES)}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """CIFAR-10's shape, 10 classes, 200 training and 100 test images: enough for any example to run."""
    folder = tmp_path_factory.mktemp("tiny-cifar")
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("test", 100)):
        np.save(folder / f"{split}_images.npy", rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))
        np.save(folder / f"{split}_labels.npy", np.arange(count) % 10)
    return folder


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=name)
def test_python_blocks_run(page, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTNET_DATA", str(tiny_data))
    monkeypatch.setattr(backends, "_backends", dict(backends._backends))  # a backend an example registers goes
    namespace = {"__name__": "__docs__"}
    for _, code, line in blocks(page, "python"):
        exec(compile("\n" * line + code, str(page), "exec"), namespace)  # tracebacks point into the page


def fastnet_arguments(words):
    """The arguments of fastnet in a command line, or None when it does not run fastnet."""
    if words[0] == "mpirun":
        starts = [i for i, w in enumerate(words) if w == "fastnet" or words[i:i + 3] == ["python", "-m", "fastnet"]]
        if not starts:
            return None
        words = words[starts[0]:]
    if words[0] == "fastnet":
        return words[1:]
    if words[:3] == ["python", "-m", "fastnet"]:
        return words[3:]
    return None


def check_shell_line(words):
    arguments = fastnet_arguments(words)
    if arguments is not None:
        args = cli.build_parser().parse_args(arguments)  # UsageError on a flag or value fastnet refuses
        if args.command == "train" and not args.resume:
            cli.train_config(args).check()
    elif words[:2] == ["pip", "install"]:
        for word in words[2:]:
            for extras in re.findall(r"\[([^\]]+)\]", word):
                unknown = set(extras.split(",")) - EXTRAS
                assert not unknown, f"no such extra: {unknown}"
    elif words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        if not words[1].startswith("../"):  # outside the repository: the developers' shared folder
            assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
    elif words[0] == "pytest":
        for word in words[1:]:
            if not word.startswith("-") and ("/" in word or word.endswith(".py")):
                assert (ROOT / word.split("::")[0]).exists(), f"no test path {word}"
    elif words[0] == "bash" or words[0].startswith(("tools/", ".ci/")):
        script = words[1] if words[0] == "bash" else words[0]
        assert (ROOT / script).is_file(), f"no script {script}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "bash")], ids=name)
def test_shell_lines_name_what_exists_and_fastnet_takes_them(page):
    lines = shell_lines(page)
    for line, words in lines:
        try:
            check_shell_line(words)
        except (AssertionError, FastnetError) as exc:  # a bad flag or value is a UsageError or SettingError
            raise AssertionError(f"{name(page)}:{line}: {shlex.join(words)}: {exc}") from None


def test_a_shell_line_with_a_wrong_flag_or_extra_is_caught():
    """The checker itself: what it must refuse, it refuses."""
    for words in (["fastnet", "train", "--epochz", "3"], ["fastnet", "train", "--dropout", "1.5"],
                  ["mpirun", "-n", "2", "fastnet", "train", "--distributd"], ["pip", "install", "-e", ".[gpu]"],
                  ["python", "tools/no_such_tool.py"], ["pytest", "tests/test_nothing.py"]):
        with pytest.raises((AssertionError, FastnetError)):
            check_shell_line(words)
    check_shell_line(["mpirun", "-n", "2", "fastnet", "train", "--distributed", "--recipe", "fast"])


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "toml")], ids=name)
def test_toml_blocks_are_search_spaces_a_sweep_loads(page, tmp_path):
    for index, (_, code, _) in enumerate(blocks(page, "toml")):
        path = tmp_path / f"space-{index}.toml"
        path.write_text(code)
        assert space.load(path).settings
