"""Build lorakit's packaged default data set from the Jargon File 4.4.7 (public domain).

The raw file is the text rendering of the HTML edition. Its glossary (between the line
`Glossary` and `Appendix A. Hacker Folklore`) looks like this:

      A                                   <- a letter section (2-space indent) ...
       abbrev                             <- ... followed by a table of contents (skipped)

       :abbrev: /@·breev'/, n.            <- headword, pronunciation, part of speech

       [common] Common abbreviation for    <- definition paragraphs (3-space indent)
       {abbreviation}.                    <- {braces} mark cross-references

Preformatted blocks (code, ASCII art: any other indent) and the captions of the Crunchly
cartoons are dropped. Each entry becomes one instruction example:

    {"instruction": "What does \"X\" mean in hacker jargon?", "output": "...", "split": "train"}

The held-out split is a hash of the headword (sha256, so it is the same on every Python), and
the output is sorted, so running this script again gives a byte-identical file.

    python scripts/build_jargon.py [--src PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "jargon" / "jargon-4.4.7.txt"
DEFAULT_OUT = REPO_ROOT / "src" / "lorakit" / "datasets" / "jargon.jsonl"

MAX_CHARS = 1000  # ~250 tokens: an instruction + answer fits a 512-token training sequence
MIN_CHARS = 10
# An entry that only points elsewhere ("See {foo}.", "Syn. {bar}.") is a poor training target.
CROSS_REFERENCE = re.compile(
    r"(?:\[[^\]]*\]\s*)?(?:\([^)]*\)\s*)?(?:[a-z]+\.\s*)?"
    r"(?:See|see|Syn\.|Syn|Same as|Plural of|Synonym for)\s[^.]*\.?"
)
EVAL_PERCENT = 5  # share of headwords held out for evaluation
SPLIT_SALT = "lorakit-jargon-4.4.7"

HEADWORD = re.compile(r"^   :(?P<head>.+?):(?: |$)")
LETTER_SECTION = re.compile(r"^  \S")  # "  A": a new letter and its table of contents
PROSE_LINE = re.compile(r"^   \S")
BOX_DRAWING = re.compile(r"[\u2500-\u257f]")  # tables
# Pronunciations: /@·breev'/ and friends. Require a pronunciation mark inside the slashes so
# that paths (/dev/null) and URLs survive.
_PRON = r"(?<![\w/])/[^/\s](?=[^/\n]{0,40}/)[^/\n]*?[·'`´@][^/\n]*?/"
PRONUNCIATION = re.compile(rf"\s*(?:\({_PRON}\)|{_PRON})(?=[\s,.;:)]|$)")
EMPTY_PRONUNCIATION = re.compile(r"\s*\(//\)|\s//(?=[\s,.;:)])")
CROSS_REF_BRACES = re.compile(r"\{([^{}\s][^{}]*)\}")
CARTOON = re.compile(r"cartoon in the Crunchly saga|last cartoon in the Crunchly")
QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "´": "'", "`": "'"})
# A sentence ends at . ! ? (maybe closing a quote or bracket) before a capital or a paragraph
# break, and is not a sense number ("7.") opening a paragraph.
SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s+[A-Z\"'(\[]|\n|$)")
SENSE_NUMBER = re.compile(r"(?:^|\n)\d+\.$")


def glossary_lines(text: str) -> list[str]:
    """The lines between the glossary heading and the first appendix."""
    lines = text.replace("\xa0", " ").splitlines()  # the headings use no-break spaces
    start = lines.index("Glossary")
    end = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))
    return lines[start + 1 : end]


def paragraphs(lines: list[str]) -> list[list[str]]:
    """Blank-line separated blocks of lines."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def parse_entries(text: str) -> list[tuple[str, list[str]]]:
    """(headword, definition paragraphs as raw line lists) for every glossary entry."""
    entries: list[tuple[str, list[list[str]]]] = []
    for block in paragraphs(glossary_lines(text)):
        match = HEADWORD.match(block[0])
        if match:
            entries.append((match["head"], []))
        elif LETTER_SECTION.match(block[0]):
            entries.append(("", []))  # table of contents until the next headword: ignore
        elif entries and entries[-1][0]:
            entries[-1][1].append(block)
    return [(head, keep_prose(body)) for head, body in entries if head]


def keep_prose(body: list[list[str]]) -> list[str]:
    """Join the prose paragraphs; drop preformatted blocks and cartoon captions."""
    kept: list[str] = []
    for block in body:
        if not all(PROSE_LINE.match(line) and not BOX_DRAWING.search(line) for line in block):
            # Code or ASCII art: drop it, and the sentence that introduces it ("...:"),
            # unless that sentence is the whole definition.
            if kept and kept[-1].endswith(":"):
                kept[-1] = drop_last_sentence(kept[-1], is_first=len(kept) == 1)
                if not kept[-1]:
                    kept.pop()
                elif kept[-1].endswith(":"):
                    kept[-1] = kept[-1][:-1] + "."
            continue
        para = join_lines(block)
        if CARTOON.search(para):
            # The caption of the cartoon ("A literal {bit bucket}.") sits just before the
            # pointer to the next cartoon; real definition paragraphs are longer.
            if kept and len(kept[-1]) < 80 and not re.match(r"\d+\. ", kept[-1]):
                kept.pop()
            continue
        kept.append(para)
    return kept


def drop_last_sentence(paragraph: str, is_first: bool) -> str:
    """The paragraph without its last sentence; a lone first paragraph is kept whole."""
    ends = [m.end() for m in SENTENCE_END.finditer(paragraph) if m.end() < len(paragraph)]
    if ends:
        return paragraph[: ends[-1]]
    return paragraph if is_first else ""


def join_lines(block: list[str]) -> str:
    """Undo the line wrapping of one paragraph."""
    text = ""
    for line in block:
        line = line.strip()
        # A wrapped compound ("semi-" / "closed") keeps its hyphen and gets no space; a wrapped
        # dash ("clue --" / "sapience") does.
        if text.endswith("-") and not text.endswith("--") and line[:1].isalpha():
            text += line
        else:
            text += (" " if text else "") + line
    return text


def clean(paragraph: str) -> str:
    """Strip markup from one paragraph: cross-reference braces, pronunciations, odd quotes."""
    text = paragraph.translate(QUOTES)
    text = PRONUNCIATION.sub("", text)
    text = EMPTY_PRONUNCIATION.sub("", text)
    for _ in range(2):  # {bit bucket} -> bit bucket (once nested: {{VAX}}); a lone { stays
        text = CROSS_REF_BRACES.sub(r"\1", text)
    text = re.sub(r"\(\s*\)", "", text)  # parentheses left empty by a removed pronunciation
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def truncate(text: str, limit: int = MAX_CHARS) -> str:
    """Cut at the last sentence end before `limit` (or the last word if there is none)."""
    if len(text) <= limit:
        return text
    ends = [
        m.end()
        for m in SENTENCE_END.finditer(text)
        if m.end() <= limit and not SENSE_NUMBER.search(text[: m.end()])
    ]
    if ends and ends[-1] >= limit // 3:
        return text[: ends[-1]]
    return text[:limit].rsplit(" ", 1)[0] + "..."


def split_of(headword: str) -> str:
    """'eval' for a fixed ~5% of headwords, 'train' otherwise; stable across Python versions."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{headword}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def build_examples(text: str) -> list[dict[str, str]]:
    examples: dict[str, dict[str, str]] = {}
    for head, body in parse_entries(text):
        output = truncate("\n\n".join(clean(p) for p in body if clean(p)))
        if len(output) < MIN_CHARS or CROSS_REFERENCE.fullmatch(output) or head in examples:
            continue
        examples[head] = {
            "instruction": f'What does "{head}" mean in hacker jargon?',
            "output": output,
            "split": split_of(head),
        }
    return [examples[h] for h in sorted(examples, key=lambda h: (h.casefold(), h))]


def write_jsonl(examples: list[dict[str, str]], out: Path) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; package data must be readable
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="jargon-4.4.7.txt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL")
    args = parser.parse_args(argv)
    examples = build_examples(args.src.read_text(encoding="utf-8"))
    write_jsonl(examples, args.out)
    n_eval = sum(ex["split"] == "eval" for ex in examples)
    print(
        f"{args.out}: {len(examples)} entries ({len(examples) - n_eval} train, {n_eval} eval), "
        f"{args.out.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
