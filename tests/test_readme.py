"""What the README tells a user holds: it points at nothing only this repository's developers have,
and the facts it repeats are the code's."""

import re
from pathlib import Path

from fastnet.data import downloading

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def sections():
    """{title: text} of the README's ## sections."""
    parts = re.split(r"^## (.+)$", README, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


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
