"""Text every machine has: the standard library's sources, and strings that trip tokenizers."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files(limit: int = 80) -> list[Path]:
    """Source files of the installed Python standard library: a corpus every machine has."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]


def stdlib_texts(limit: int = 80) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(limit)]


def short_documents() -> list[str]:
    """Documents on both sides of each filter's threshold."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    return [
        "!?" * 150 + "abc",                       # 303 characters, 3 after normalisation
        "a, b. c; d: " * 30,                      # 360 characters, under 200 after normalisation
        (words * 4)[:230],                        # passes the character filter, under 256 tokens
        words * 40,                               # long enough for both
        "Ünïcödé façade — naïve café " * 20,      # non-ASCII, long enough
    ]


HARD_STRINGS = [
    " Paris", "Paris", "  two leading", "a  b   c", "trailing ", "trailing  ", "\n", "\nx",
    "a\n\nb", "\tx\ty", " \t \n ", "ünïcödé", "é\u0301 combining", "日本語のテキスト", "中文 字符",
    "emoji 🙂🚀 ok", "👩\u200d💻", "a</s>b", " </s> ", "<s>x", "x <unk> y", "</s>", "\x00\x01\x7f",
    "1234567 89", "  ", " ", "ﬁ ligature", "Ｆｕｌｌ width", "tab\tend\t", "crlf\r\nline",
    "def f(x):\n    return x  # comment\n", "ﾊﾝｶｸ", "\u00a0nbsp\u00a0", "ending newline\n",
]


def tokenizer_corpus() -> list[str]:
    """Hard strings and lines of Python: what every tokenizer must agree on."""
    lines = [line for text in stdlib_texts(30)[20:] for line in text.splitlines()][:120]
    return HARD_STRINGS + lines + ["\n".join(lines[i:i + 5]) for i in range(0, 60, 5)]
