import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI clones main with shared/ next to it).
SHARED_DATA = Path(os.environ.get("GPTSTACK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set GPTSTACK_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_texts(shared_data) -> dict[str, str]:
    """A slice of each real corpus: tinyshakespeare, TinyStories, hh-rlhf transcripts, GSM8K."""
    hh = []
    with gzip.open(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            hh += [row["chosen"], row["rejected"]]
    gsm = []
    with open(shared_data / "gsm8k/train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            gsm += [row["question"], row["answer"]]
    return {
        "tinyshakespeare": (shared_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8"),
        "tinystories": (shared_data / "tinystories/tinystories_val.txt").read_text(encoding="utf-8"),
        "hh-rlhf": "\n".join(hh),
        "gsm8k": "\n".join(gsm),
    }
