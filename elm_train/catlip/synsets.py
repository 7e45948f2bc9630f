"""Captions to WordNet noun synsets, as CatLIP (CoreNet's wordnet_tagged_classification) does it.

Needs NLTK and the WordNet 3.0 database, not torch, so the Mac side and `elm catlip synsets`
run without it. Procedure (docs/reference.md section 5, CoreNet's `caption_preprocessing` and
`_convert_caption_to_labels`): unquote URL escapes, '+' to space, strip HTML tags, strip
newlines at the ends, collapse spaces, ftfy.fix_text, strip, lowercase; split into sentences
and words; lemmatize each word with WordNet (noun); keep it when `wn.synset(word + ".n.01")`
exists and is named exactly `word.n.01`; its id is pos + offset, e.g. `n2084071`.

Word splitting: CoreNet calls `nltk.word_tokenize`, i.e. the Punkt sentence splitter with its
trained English model, then NLTKWordTokenizer per sentence. The trained model is a separate
download; we use Punkt untrained (which needs no data) and the same word tokenizer. The only
difference is at abbreviations Punkt's English model knows ("mr.", "st."), whose tokens have
no `word.n.01` synset either way.

WordNet is looked up in NLTK's data path first. Without it, an NLTK data directory is built
once from the Debian/Ubuntu packages wordnet-base and wordnet-sense-index (the same 3.0
database, canonical offsets) in the user cache directory.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elm_spec import ElmError

DEBIAN_WORDNET_ENV = "ELM_WORDNET_DIR"
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("index.sense", "index.adj", "index.adv", "index.noun", "index.verb",
                 "data.adj", "data.adv", "data.noun", "data.verb",
                 "adj.exc", "adv.exc", "noun.exc", "verb.exc")
OPTIONAL_WORDNET_FILES = ("cntlist.rev",)
INSTALL_HINT = ("WordNet 3.0 not found: install it with `python -m nltk.downloader wordnet`, "
                "or on Debian/Ubuntu `apt-get install wordnet-base wordnet-sense-index` "
                f"(or point {DEBIAN_WORDNET_ENV} at a directory holding data.noun, index.noun, ...)")

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)); Debian ships no `lexnames` file.
LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2),
    ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2),
    ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)

_HTML_TAG = re.compile("<.*?>")
_SPACES = re.compile(" +")


def preprocess_caption(caption: str) -> str:
    """CoreNet's caption_preprocessing, step for step."""
    import ftfy

    text = urllib.parse.unquote(str(caption))
    text = text.replace("+", " ")
    text = _HTML_TAG.sub("", text)
    text = text.strip("\n")
    text = _SPACES.sub(" ", text)
    text = ftfy.fix_text(text)
    return text.strip().lower()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "elm" / "nltk_data"


def _nltk_has_wordnet() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")  # also finds corpora/wordnet.zip
    except LookupError:
        return False
    return True


def build_nltk_wordnet(source: Path, data_dir: Path) -> Path:
    """Write DATA_DIR/corpora/wordnet from a WordNet 3.0 dict directory, atomically."""
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if missing:
        raise ElmError(f"{source}: no {missing[0]} (incomplete WordNet; {INSTALL_HINT})")
    target = data_dir / "corpora" / "wordnet"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet.tmp-", dir=target.parent))
    try:
        for name in WORDNET_FILES + OPTIONAL_WORDNET_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        (staging / "lexnames").write_text("".join(
            f"{number:02d}\t{name}\t{category}\n" for number, (name, category) in enumerate(LEXNAMES)))
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "data.noun").is_file():  # nothing there, and still cannot rename
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process built it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return data_dir


def ensure_wordnet() -> None:
    """Make `nltk.corpus.wordnet` loadable offline, or raise ElmError saying how to install it."""
    import nltk

    if _nltk_has_wordnet():
        return
    data_dir = cache_dir()
    if not (data_dir / "corpora" / "wordnet" / "data.noun").is_file():
        source = Path(os.environ.get(DEBIAN_WORDNET_ENV, DEBIAN_WORDNET_DIR))
        if not (source / "data.noun").is_file():
            raise ElmError(INSTALL_HINT)
        build_nltk_wordnet(source, data_dir)
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))


@dataclass(frozen=True)
class Synset:
    id: str
    name: str


def _index_cache_file(root: Path) -> Path:
    """Where the parsed lemma index of the WordNet at ROOT is kept, keyed by its files' sizes
    and times (kept by the copy from the Debian files, so every copy shares one index)."""
    import hashlib

    stamp = []
    for name in ("index.noun", "index.verb", "index.adj", "index.adv", "data.adj"):
        stat = (root / name).stat()
        stamp.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]
    return cache_dir() / f"wordnet-index-{digest}.json"


def _wordnet_reader_class():
    import json
    from collections import defaultdict

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        """NLTK's WordNet reader, loading in about a tenth of the time: it skips the synset map
        to other WordNet versions (used only by the multilingual OMW functions) and keeps the
        parsed lemma index and adjective-satellite set in a JSON file (data, never code) beside the cached data
        (NLTK re-parses the text index files, about 10 s of CPU, in every process)."""

        def _scan_satellites(self) -> None:
            self._cached_index = None
            root = Path(str(self.root))
            self._index_cache = _index_cache_file(root) if (root / "index.noun").is_file() else None
            if self._index_cache is not None and self._index_cache.is_file():
                try:
                    cached = json.loads(self._index_cache.read_text())
                    self._cached_index = {"satellites": set(cached["satellites"]),
                                          "lemmas": defaultdict(dict, cached["lemmas"])}
                except (OSError, ValueError, KeyError, TypeError):
                    self._cached_index = None  # unreadable: rebuilt from the WordNet files
            if self._cached_index is not None:
                self.satellite_offsets = self._cached_index["satellites"]
            else:
                super()._scan_satellites()

        def _load_lemma_pos_offset_map(self) -> None:
            if self._cached_index is not None:
                self._lemma_pos_offset_map = self._cached_index["lemmas"]
                return
            super()._load_lemma_pos_offset_map()
            if self._index_cache is not None:
                self._write_index_cache()

        def _write_index_cache(self) -> None:
            data = {"satellites": sorted(self.satellite_offsets), "lemmas": self._lemma_pos_offset_map}
            try:
                self._index_cache.parent.mkdir(parents=True, exist_ok=True)
                fd, staging = tempfile.mkstemp(dir=self._index_cache.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as handle:
                    json.dump(data, handle)
                os.replace(staging, self._index_cache)
            except OSError:
                pass  # a read-only cache only costs speed

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return EnglishWordNet


class SynsetExtractor:
    """caption -> the noun synsets CatLIP labels it with, in caption order (repeats kept)."""

    def __init__(self) -> None:
        ensure_wordnet()
        import nltk
        from nltk.corpus.reader.wordnet import WordNetError
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        try:
            root = nltk.data.find("corpora/wordnet")
        except LookupError:
            raise ElmError(INSTALL_HINT) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available"
            self._wordnet = _wordnet_reader_class()(root, None)
        self._wordnet_error = WordNetError
        self._sentences = PunktSentenceTokenizer()
        self._words = NLTKWordTokenizer()
        self._by_word: dict[str, Synset | None] = {}

    def lemmatize(self, word: str) -> str:
        """WordNetLemmatizer.lemmatize(word) (noun): the shortest morphy lemma, else the word."""
        lemmas = self._wordnet._morphy(word, "n")
        return min(lemmas, key=len) if lemmas else word

    def words(self, text: str) -> list[str]:
        return [word for sentence in self._sentences.tokenize(text)
                for word in self._words.tokenize(sentence)]

    def synset_of_word(self, word: str) -> Synset | None:
        if word not in self._by_word:
            self._by_word[word] = self._lookup(word)
        return self._by_word[word]

    def _lookup(self, word: str) -> Synset | None:
        lemma = self.lemmatize(word)
        try:
            synset = self._wordnet.synset(f"{lemma}.n.01")
        except (self._wordnet_error, ValueError):
            # no noun lemma (WordNetError), or a token such as "..." that is no synset name
            return None
        if synset.name() != f"{lemma}.n.01":
            return None
        return Synset(f"{synset.pos()}{synset.offset()}", synset.name())

    def __call__(self, caption: str) -> list[Synset]:
        found = (self.synset_of_word(word) for word in self.words(preprocess_caption(caption)))
        return [synset for synset in found if synset is not None]

    def ids(self, caption: str) -> list[str]:
        return [synset.id for synset in self(caption)]


@functools.lru_cache(maxsize=1)
def shared_extractor() -> SynsetExtractor:
    """One SynsetExtractor per process (WordNet loads once)."""
    return SynsetExtractor()


def unique_in_order(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))
