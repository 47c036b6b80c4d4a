"""Write CPython's reference documentation (pydoc_data.topics: 79 documents, ~465 KB) as JSONL.

Real English text about Python that ships with every CPython, so the quickstart needs no download.
    python scripts/pydoc_corpus.py data/pydoc_topics.jsonl
"""

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics


def main(path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for name in sorted(topics):
            handle.write(json.dumps({"topic": name, "text": topics[name]}, ensure_ascii=False) + "\n")
    print(f"wrote {len(topics)} documents to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/pydoc_topics.jsonl")
