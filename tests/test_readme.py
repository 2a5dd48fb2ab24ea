"""What the README tells a user holds: it points at nothing only this repository's developers have,
and the facts it repeats are the code's."""

import re
from pathlib import Path

from fastnet.data import downloading

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def sections():
    """{title: text} of the README's ## sections."""
    parts = re.split(r"^## (.+)$", README, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_only_the_development_section_mentions_the_development_data():
    found = sections()
    assert "Development" in found and "../shared" in found["Development"]
    for title, text in found.items():
        if title != "Development":
            assert "../shared" not in text and "build.py" not in text, title


def test_the_offline_instructions_give_the_url_and_md5_that_download_uses():
    offline = sections()["Data"].split("**Offline.**")[1].split("\n\n**")[0]
    assert downloading.CIFAR10_URL in offline and downloading.CIFAR10_MD5 in offline
    assert "--data" in offline and "FASTNET_DATA" in offline


def test_the_first_screen_names_the_cpu_its_figures_come_from():
    first_screen = README.split("## Quick start")[0]
    assert re.search(r"AMD EPYC \(Zen 3, family 25 model 1; AVX2 and FMA, no\s+AVX-512; NumPy's OpenBLAS [\d.]+ with "
                     r"its Haswell kernels\)", first_screen)
    speed = sections()["Speed"]
    # One row per machine for the default run, each naming its CPU and BLAS kernel.
    rows = [line for line in speed.split("**The default run**")[1].split("\n\n")[1].splitlines()[2:]]
    named = [row.split("|")[1].strip() for row in rows if row.split("|")[1].strip()]
    assert len(named) >= 3 and all(("AMD EPYC" in cpu or "Intel Xeon" in cpu) and "OpenBLAS" in cpu for cpu in named)
