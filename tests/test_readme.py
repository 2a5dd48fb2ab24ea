"""What the README and the guides in docs/ tell a user holds: the facts they repeat are the code's,
every page they point at exists, and dated measurements live in the results log alone."""

import pathlib
import re

from fastnet import workloads
from fastnet.config import RECIPES
from fastnet.data import downloading
from fastnet.workloads import WORKLOADS

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
GUIDES = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def section(text, title):
    """The text of the `## title` section of a page."""
    return re.split(r"^## ", text.split(f"\n## {title}\n", 1)[1], flags=re.MULTILINE)[0]


def test_the_readme_is_a_front_page_that_links_every_guide_and_the_log():
    assert len(README.splitlines()) <= 250
    links = set(re.findall(r"\]\(([^)#]+)", README))
    local = {link for link in links if not link.startswith("http")}
    assert all((ROOT / link).is_file() for link in local), [link for link in local if not (ROOT / link).is_file()]
    assert {f"docs/{name}" for name in GUIDES} <= local, "a guide the README does not point at"
    assert "benchmarks/RESULTS.md" in local


def test_links_between_guides_resolve():
    for name, text in GUIDES.items():
        for link in re.findall(r"\]\(([^)#]+)", text):
            if not link.startswith("http"):
                assert (ROOT / "docs" / link).resolve().is_file(), f"docs/{name} links to {link}, which does not exist"


def test_the_fixed_workloads_are_the_readmes():
    """fastnet/workloads.py's workloads are the ones the README describes and measures, no more and no fewer."""
    described = section(README, "How fast")
    for workload in WORKLOADS.values():
        network = "-".join(map(str, workload.sizes))
        said = rf"{workload.name}\s+(is\s+)?an?\s+{network}\s+MLP\s+with\s+batch\s+{workload.batch_size}\b"
        assert re.search(said, described), workload
    measured = {line.split("|")[1].strip() for line in described.splitlines()
                if line.startswith("| ") and not line.startswith(("| workload", "| ---"))}
    assert measured == set(WORKLOADS), "the README's table of measurements names other workloads"
    assert workloads.DTYPE in described and "momentum" in described


def test_the_recipes_table_says_what_each_recipe_sets():
    rows = {line.split("|")[1].strip(): line for line in section(README, "Recipes").splitlines()
            if line.startswith("| `--recipe")}
    assert set(rows) == {f"`--recipe {name}`" for name in RECIPES}
    for name, settings in RECIPES.items():
        row = rows[f"`--recipe {name}`"]
        assert f"{settings['pca']} whitened" in row and f"{settings['epochs']} epochs" in row
        assert "-".join(map(str, settings.get("hidden", ()))) in row


def test_the_offline_instructions_give_the_url_and_md5_that_download_uses():
    offline = section(GUIDES["data.md"], "Offline")
    assert downloading.CIFAR10_URL in offline and downloading.CIFAR10_MD5 in offline
    assert "--data" in offline and "FASTNET_DATA" in offline


def test_only_the_development_section_mentions_the_development_data():
    pages = {"README.md": README, **{f"docs/{name}": text for name, text in GUIDES.items()}}
    development = section(GUIDES["testing.md"], "Development")
    assert "../shared" in development
    for name, text in pages.items():
        outside = text.replace(development, "") if name == "docs/testing.md" else text
        assert "../shared" not in outside and "build.py" not in outside, name


def test_the_module_map_lists_every_module():
    mapped = re.search(r"```text\nfastnet/\n(.*?)```", GUIDES["architecture.md"], re.DOTALL).group(1)
    listed = set(re.findall(r"^  (\S+\.py)", mapped, re.MULTILINE))
    modules = {str(p.relative_to(ROOT / "fastnet")) for p in (ROOT / "fastnet").rglob("*.py")}
    assert listed == modules


MEASURED = re.compile(r"(?<![\w.])\d[\d,.]*\s*(samples/s|images a second|GFLOP/s|% of (the )?(sgemm )?peak|ms a step|"
                      r"ms per step|min \d+ s)")


def test_dated_measurements_live_in_the_results_log_alone():
    """The guides and the code cite the log; only the README's front-page tables carry figures."""
    for name, text in GUIDES.items():
        assert not MEASURED.search(text), f"docs/{name}: {MEASURED.search(text).group(0)!r}: move it to the log"
    for path in (ROOT / "fastnet").rglob("*.py"):
        found = MEASURED.search(path.read_text())
        assert not found, f"{path.relative_to(ROOT)}: {found.group(0)!r}: a timing in code goes stale"
    log = RESULTS.read_text()
    assert MEASURED.search(log) and "commit" in log
