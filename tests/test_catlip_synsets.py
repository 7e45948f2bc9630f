"""Caption -> synset labels: CoreNet's procedure, checked against the WordNet files themselves."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest
from support.cli import run_elm

from elm_train.catlip.synsets import (
    DEBIAN_WORDNET_DIR,
    WORDNET_FILES,
    SynsetExtractor,
    build_nltk_wordnet,
    preprocess_caption,
    shared_extractor,
)


@pytest.fixture(scope="module")
def extractor() -> SynsetExtractor:
    return shared_extractor()


def wordnet_root(extractor: SynsetExtractor) -> Path:
    return Path(str(extractor._wordnet.root))


def first_noun_sense(root: Path, lemma: str) -> tuple[str, str] | None:
    """Independent of NLTK: sense 1 of LEMMA from index.noun, its first word from data.noun."""
    text = (root / "index.noun").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(lemma)} n (\d+) .*$", text, flags=re.MULTILINE)
    if match is None:
        return None
    offset = match.group(0).split()[-int(match.group(1))]
    with (root / "data.noun").open("rb") as data:
        data.seek(int(offset))
        first_word = data.readline().decode().split()[4].lower()
    return f"n{int(offset)}", f"{first_word}.n.01"


def test_preprocessing_follows_corenet_step_by_step():
    import ftfy

    caption = "  Two%20DOGS+on <b>the</b>   beach\n"
    expected = urllib.parse.unquote(caption).replace("+", " ")
    expected = re.sub(" +", " ", re.sub("<.*?>", "", expected).strip("\n"))
    assert preprocess_caption(caption) == ftfy.fix_text(expected).strip().lower()
    assert preprocess_caption(caption) == "two dogs on the beach"
    assert preprocess_caption("caf\u00c3\u00a9 &amp; bar") == "café & bar"  # ftfy repairs mojibake


def test_hand_derived_captions(extractor):
    """Ids and names read off index.noun/data.noun by hand (WordNet 3.0 offsets)."""
    cases = {
        "Two dogs%20chasing a+cat. <i>Bicycles</i>!": [
            ("n13743269", "two.n.01"), ("n2084071", "dog.n.01"), ("n2121620", "cat.n.01"),
            ("n2834778", "bicycle.n.01")],
        "geese and mice": [("n1855672", "goose.n.01"), ("n2330245", "mouse.n.01")],
        # automobile.n.01 is car.n.01 and photo.n.01 is photograph.n.01: both dropped
        "an automobile photo": [],
        "xyzzy qwertzuiop": [],  # words WordNet lacks
        "": [],
        "a dog. a dog": [("n2084071", "dog.n.01"), ("n2084071", "dog.n.01")],
    }
    for caption, expected in cases.items():
        got = [(s.id, s.name) for s in extractor(caption)]
        assert got == expected, caption


def test_agrees_with_the_wordnet_database_on_varied_captions(extractor):
    """Every kept word and every dropped word, re-derived from the raw WordNet files."""
    root = wordnet_root(extractor)
    captions = [
        "<p>A <b>Red</b> Bicycle leaning on a wall</p>",
        "sunset%20over%20the%20ocean+with+boats",
        "Photo of 3 puppies & their mother, Paris 2019",
        "bicycles, automobiles and buses on the street...",
        "Ein Hund im Park",
    ]
    for caption in captions:
        words = extractor.words(preprocess_caption(caption))
        expected = []
        for word in words:
            lemma = extractor.lemmatize(word)
            sense = first_noun_sense(root, lemma)
            if sense is not None and sense[1] == f"{lemma}.n.01":
                expected.append(sense)
        assert [(s.id, s.name) for s in extractor(caption)] == expected, caption
    assert extractor.lemmatize("puppies") == "puppy"
    assert extractor.lemmatize("buses") == "bus"


def test_missing_wordnet_names_how_to_install(tmp_path, monkeypatch):
    import nltk

    from elm_spec import ElmError
    from elm_train.catlip.synsets import ensure_wordnet

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ELM_WORDNET_DIR", str(empty))
    with pytest.raises(ElmError) as error:
        ensure_wordnet()
    message = str(error.value)
    assert message.startswith("WordNet 3.0 not found")
    assert "nltk.downloader wordnet" in message and "wordnet-sense-index" in message
    assert not (tmp_path / "cache" / "elm").exists()


def test_nltk_wordnet_dir_is_built_from_the_debian_files(tmp_path):
    if not Path(DEBIAN_WORDNET_DIR, "data.noun").is_file():
        pytest.skip("Debian's wordnet-base is not installed")
    built = build_nltk_wordnet(Path(DEBIAN_WORDNET_DIR), tmp_path) / "corpora" / "wordnet"
    lexnames = (built / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[5] == "05\tnoun.animal\t1"
    assert lexnames[44] == "44\tadj.ppl\t3"
    for name in WORDNET_FILES:
        assert (built / name).read_bytes() == (Path(DEBIAN_WORDNET_DIR) / name).read_bytes()
    assert first_noun_sense(built, "dog") == ("n2084071", "dog.n.01")
    assert not list(tmp_path.glob("corpora/.wordnet.tmp-*"))  # staged, then renamed


def test_synsets_command_prints_id_and_name():
    result = run_elm("catlip", "synsets", "A dog%20and+two <b>cats</b>")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["n2084071 dog.n.01", "n13743269 two.n.01",
                                          "n2121620 cat.n.01"]


@pytest.mark.slow
def test_wordnet_index_cache_is_json_and_read_back(extractor, tmp_path, monkeypatch):
    import json

    from elm_train.catlip.synsets import _wordnet_reader_class

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reader_class = _wordnet_reader_class()
    root = extractor._wordnet.root
    parsed = reader_class(root, None)  # parses the index, writes the cache
    (cache,) = (tmp_path / "elm" / "nltk_data").glob("wordnet-index-*.json")
    data = json.loads(cache.read_text())  # plain data: nothing in it can run
    assert set(data) == {"satellites", "lemmas"}
    cached = reader_class(root, None)
    assert cached._cached_index is not None
    for lemma in ("dog", "bank", "red"):
        assert cached.synsets(lemma) == parsed.synsets(lemma)
    assert cached.satellite_offsets == parsed.satellite_offsets
