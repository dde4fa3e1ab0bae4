"""The docs name only files and modules that exist, or that the "Retired" section of docs/benchmarks.md lists (the
record of what was removed, with the git tag that keeps it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = re.compile(r"\b((?:vgf_llm|benchmarks|recipes|scripts|examples|tests|docs)/[\w/.-]*\w\.(?:py|yaml|sh|md))\b")
MODULE = re.compile(r"`(vgf_llm(?:\.\w+)+)")


def retired_names() -> str:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    return text[text.index("## Retired"):]


def exists(name: str) -> bool:
    if "/" in name:
        return (ROOT / name).exists()
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # a module, or an attribute of one (vgf_llm.sampler.SamplerConfig)
        base = ROOT.joinpath(*parts[:cut])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def test_the_docs_name_only_what_exists_or_what_was_retired():
    retired = retired_names()
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for name in set(PATH.findall(text)) | set(MODULE.findall(text)):
            short = name.rsplit("/", 1)[-1]
            if not exists(name) and short not in retired and name not in retired:
                missing.append(f"{doc.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(sorted(missing))
