"""Where benchmarks write their tables: between two markers of docs/BENCHMARKS.md."""
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def replace_between(marks, text, doc=DOC):
    """Put ``text`` between the markers ``marks`` (begin, end) of ``doc``, in place."""
    s = doc.read_text()
    a, b = s.index(marks[0]) + len(marks[0]), s.index(marks[1])
    doc.write_text(s[:a] + "\n" + text + "\n" + s[b:])
    print(f"written into {doc.relative_to(doc.parent.parent)}")
