"""The README reads for users first, and its links lead somewhere."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_commands_and_demo_picture_come_before_any_measurement_table():
    first_table = README.index("\n|---")
    for must in ("    ./scripts/demo.sh\n", "    ./scripts/test.sh\n", "(docs/images/demo-result.png)"):
        assert must in README[:first_table], f"{must.strip()!r} must come before the first table"
    assert (ROOT / "docs" / "images" / "demo-result.png").stat().st_size > 1000


def test_the_two_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / script).is_file()


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
                ROOT / "benchmarks" / "results" / "README.md", ROOT / "benchmarks" / "studies" / "README.md"]:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
