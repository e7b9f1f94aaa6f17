"""Rebuild the bundled training corpus and tokenizer in ``data_pipelines/bundled/``.

The bundled corpus is a small (~5 MB) collection of public-domain English
books, one document per chapter / book / scene / dictionary letter, so training,
tests and smoke runs work fully offline. Nothing here is needed at training
time: ``corpus.txt.gz`` and ``tokenizer.json`` are committed, and this script
only documents how they were made. See ``bundled/SOURCES.md`` for provenance.

Corpus format (UTF-8, gzip): documents separated by a line that is exactly
``<|doc|>``; inside a document, paragraphs (or verse stanzas / speeches) are
separated by one blank line.

Step 1, corpus (standard library only). Fetch the four source packages from
the ordinary registries, then point the script at them::

    pip download --no-deps --no-binary :all: -d SRC brotli==1.2.1 sentencepiece==0.2.3
    (cd SRC && apt-get download r-cran-janeaustenr=1.0.0-1 dict-devil=1.0-13.1)
    python data_pipelines/build_bundled.py corpus \\
        --brotli-sdist SRC/brotli-1.2.1.tar.gz \\
        --sentencepiece-sdist SRC/sentencepiece-0.2.3.tar.gz \\
        --janeaustenr-deb SRC/r-cran-janeaustenr_1.0.0-1_all.deb \\
        --devil-deb SRC/dict-devil_1.0-13.1_all.deb

Step 2, tokenizer (needs ``tokenizers==0.23.3``, e.g. in a throwaway venv)::

    python data_pipelines/build_bundled.py tokenizer

This trains a byte-level BPE (vocab 4096, ``<|endoftext|>`` = id 0, ByteLevel
pre-tokenizer without prefix space, ByteLevel decoder), checks that
``decode(encode(doc)) == doc`` for every document and prints corpus statistics.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import re
import struct
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CORPUS_PATH = BUNDLED_DIR / "corpus.txt.gz"
TOKENIZER_PATH = BUNDLED_DIR / "tokenizer.json"
DOC_SEPARATOR = "<|doc|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096

# --------------------------------------------------------------------------
# Reading the corpus (the only part a consumer would ever need).
# --------------------------------------------------------------------------


def read_documents(path: Path = CORPUS_PATH) -> list[str]:
    """Return the documents of a bundled corpus file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return [d.strip("\n") for d in text.split(f"\n{DOC_SEPARATOR}\n")]


def write_documents(docs: list[str], path: Path = CORPUS_PATH) -> None:
    """Write documents deterministically (fixed gzip header, no mtime/name)."""
    assert all(DOC_SEPARATOR not in d for d in docs)
    data = (f"\n{DOC_SEPARATOR}\n".join(docs) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(data)


# --------------------------------------------------------------------------
# Archive helpers: sdists (tar.gz) and Debian packages (ar + data.tar.*).
# --------------------------------------------------------------------------


def _tar_member(tar: tarfile.TarFile, member_suffix: str, source: Path) -> bytes:
    """The bytes of the first member of an open tarball whose name ends with ``member_suffix``."""
    for member in tar.getmembers():
        if member.name.endswith(member_suffix):
            f = tar.extractfile(member)
            assert f is not None
            return f.read()
    raise FileNotFoundError(f"{member_suffix} not in {source}")


def read_from_tar(tar_path: Path, member_suffix: str) -> bytes:
    """Return the bytes of the single member of a tarball ending with ``member_suffix``."""
    with tarfile.open(tar_path) as tar:
        return _tar_member(tar, member_suffix, tar_path)


def read_from_deb(deb_path: Path, member_suffix: str) -> bytes:
    """Return a file from a .deb's data archive without dpkg (a .deb is an ar archive)."""
    blob = deb_path.read_bytes()
    assert blob[:8] == b"!<arch>\n", f"{deb_path} is not a .deb"
    pos = 8
    while pos < len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return _tar_member(tar, member_suffix, deb_path)
        pos += 60 + size + (size % 2)
    raise ValueError(f"no data.tar member in {deb_path}")


# --------------------------------------------------------------------------
# A minimal reader for R's serialization format, enough for the character
# vectors that the janeaustenr package stores in its lazy-load database.
# --------------------------------------------------------------------------


class _RUnserializer:
    """Decode R's XDR serialization ('X\\n' format, versions 2 and 3)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def load(self) -> Any:
        assert self.data[:2] == b"X\n", "only XDR-serialized R objects are supported"
        self.pos = 2
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            encoding_length = self._int()
            self.pos += encoding_length  # skip the native encoding name
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        sexptype = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if sexptype == 254:  # NILVALUE_SXP
            return None
        if sexptype in (241, 242, 250, 251, 252, 253):  # special environments / markers
            return ("special", sexptype)
        if sexptype == 255:  # REFSXP
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sexptype == 1:  # SYMSXP
            symbol = ("symbol", self._item())
            self.refs.append(symbol)
            return symbol
        if sexptype in (2, 6, 239, 240):  # pairlist-like: [(tag, value), ...]
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            head = [(tag, self._item())]
            tail = self._item()
            return head + tail if isinstance(tail, list) else head
        if sexptype == 9:  # CHARSXP
            length = self._int()
            if length == -1:
                return None  # NA_character_
            text = self.data[self.pos : self.pos + length].decode("utf-8")
            self.pos += length
            return text
        length = self._int()
        if sexptype in (10, 13):  # logical, integer
            value: list[Any] = list(struct.unpack_from(f">{length}i", self.data, self.pos))
            self.pos += 4 * length
        elif sexptype == 14:  # double
            value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
            self.pos += 8 * length
        elif sexptype in (16, 19, 20):  # character vector, list, expression
            value = [self._item() for _ in range(length)]
        else:
            raise ValueError(f"unsupported R SEXP type {sexptype}")
        if has_attr:
            attributes = {tag[1]: v for tag, v in self._item()}
            if "names" in attributes:
                return dict(zip(attributes["names"], value))
        return value


def _r_decompress(blob: bytes) -> bytes:
    """Undo R's lazy-load compression: 4-byte length, then zlib (or a typed bz2/xz/raw stream)."""
    (expected,) = struct.unpack(">I", blob[:4])
    try:
        out = zlib.decompress(blob[4:])
    except zlib.error:
        kind, body = blob[4:5], blob[5:]
        decompressors: dict[bytes, Callable[[bytes], bytes]] = {
            b"2": bz2.decompress,
            b"X": lzma.decompress,
            b"0": bytes,
        }
        out = decompressors[kind](body)
    assert len(out) == expected
    return out


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Return every object of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``)."""
    index = _RUnserializer(gzip.decompress(rdx)).load()
    assert isinstance(index, dict)
    objects = {}
    for name, (offset, length) in index["variables"].items():
        objects[name] = _RUnserializer(_r_decompress(rdb[offset : offset + length])).load()
    return objects


# --------------------------------------------------------------------------
# Text normalisation.
# --------------------------------------------------------------------------


def clean_lines(text: str) -> list[str]:
    """NFC-normalise, drop a BOM, unify newlines, strip trailing blanks."""
    text = unicodedata.normalize("NFC", text.lstrip("\ufeff")).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)  # e.g. DOS end-of-file ^Z
    return [line.rstrip() for line in text.split("\n")]


def blocks(lines: list[str]) -> Iterator[list[str]]:
    """Yield runs of non-blank lines."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield current
            current = []
    if current:
        yield current


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def prose_paragraphs(lines: list[str]) -> list[str]:
    """Unwrap hard-wrapped prose, keeping indented verse/quotations line by line.

    A block whose lines are all indented (and has 2+ lines) is verse: kept as
    lines. Otherwise an indented line starts a new paragraph, and the lines of
    a paragraph are joined with single spaces.
    """
    out: list[str] = []
    for block in blocks(lines):
        if len(block) > 1 and all(line[:1].isspace() for line in block):
            out.append("\n".join(squash(line) for line in block))
            continue
        paragraph: list[str] = []
        for i, line in enumerate(block):
            if i > 0 and line[:1].isspace() and paragraph:
                out.append(squash(" ".join(paragraph)))
                paragraph = []
            paragraph.append(line)
        out.append(squash(" ".join(paragraph)))
    return out


def verse_paragraphs(lines: list[str]) -> list[str]:
    """Keep verse line by line; an indented line opens a new verse paragraph."""
    out: list[str] = []
    for block in blocks(lines):
        stanza: list[str] = []
        for line in block:
            if line[:1].isspace() and stanza:
                out.append("\n".join(stanza))
                stanza = []
            stanza.append(squash(line))
        out.append("\n".join(stanza))
    return out


def play_paragraphs(lines: list[str]) -> list[str]:
    """Moby-Shakespeare layout: 'NAME<TAB>first line', continuation lines tab-indented."""
    out: list[str] = []
    for block in blocks(lines):
        rendered = []
        for line in block:
            if "\t" in line and not line.startswith("\t"):
                speaker, speech = line.split("\t", 1)
                rendered.append(f"{squash(speaker)}: {squash(speech)}")
            else:
                rendered.append(squash(line))
        out.append("\n".join(rendered))
    return out


def reflow_unbroken(lines: list[str], width: int = 72) -> list[str]:
    """Recover paragraphs from text whose blank lines were removed.

    A line ends a paragraph when the next line's first word would still have
    fitted on it under greedy wrapping at ``width`` and the line either ends
    like a sentence or is short (a title). A heuristic: a few joins/splits are
    wrong.
    """
    out: list[str] = []
    paragraph: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        paragraph.append(line)
        nxt = next((n for n in lines[i + 1 :] if n.strip()), "")
        first_word = nxt.split()[0] if nxt.split() else ""
        fits = len(line) + 1 + len(first_word) <= width
        if not nxt or (fits and (line.rstrip()[-1] in ".!?:;\"')-" or len(line) < width // 2)):
            out.append(squash(" ".join(paragraph)))
            paragraph = []
    return out


def strip_emphasis(text: str) -> str:
    """Gutenberg marks italics as _word_; keep the word, drop the underscores."""
    return re.sub(r"_([^_\n]+?)_", r"\1", text)


def split_chapters(lines: list[str], is_heading: Callable[[str], bool], min_chars: int = 300) -> list[list[str]]:
    """Split lines at headings; sections too short to stand alone join the next one."""
    sections: list[list[str]] = [[]]
    for line in lines:
        if is_heading(line) and any(x.strip() for x in sections[-1]):
            sections.append([])
        sections[-1].append(line)
    merged: list[list[str]] = []
    carry: list[str] = []
    for section in sections:
        section = carry + section
        if sum(len(x) for x in section) < min_chars:
            carry = section + [""]
        else:
            merged.append(section)
            carry = []
    if carry:
        merged[-1] += carry
    return merged


def make_docs(sections: list[list[str]], render: Callable[[list[str]], list[str]]) -> list[str]:
    return ["\n\n".join(p for p in render(section) if p) for section in sections]


# --------------------------------------------------------------------------
# Per-source extraction.
# --------------------------------------------------------------------------

AUSTEN_ORDER = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter|VOLUME)\s+[IVXLC\d]+\.?\s*$")


def austen_docs(deb: Path) -> list[str]:
    """Jane Austen's six novels from r-cran-janeaustenr (one character vector per novel)."""
    prefix = "janeaustenr/data/Rdata"
    novels = read_r_lazyload(read_from_deb(deb, prefix + ".rdx"), read_from_deb(deb, prefix + ".rdb"))
    docs: list[str] = []
    for name in AUSTEN_ORDER:
        lines = [unicodedata.normalize("NFC", x or "").rstrip() for x in novels[name]]
        if name == "northangerabbey":  # drop a modern editor's "A NOTE ON THE TEXT" at the end
            lines = lines[: lines.index("A NOTE ON THE TEXT")]
        text = "\n".join(lines)
        # Editorial notes of the digitised editions, not Austen's text.
        text = re.sub(r"\[(End volume|At this point)[^\]]*\]", "", text)
        sections = split_chapters(text.split("\n"), lambda s: bool(_CHAPTER.match(s)))
        docs += [strip_emphasis(d) for d in make_docs(sections, prose_paragraphs)]
    return docs


def alice_docs(brotli_sdist: Path) -> list[str]:
    """Alice's Adventures in Wonderland (Millennium Fulcrum 2.9, Canterbury corpus copy)."""
    lines = clean_lines(read_from_tar(brotli_sdist, "tests/testdata/alice29.txt").decode("ascii"))
    lines = [line.replace("`", "'") for line in lines]  # `quotes' -> 'quotes'
    sections = split_chapters(lines, lambda s: bool(re.match(r"^\s*CHAPTER [IVX]+\s*$", s)))
    return [strip_emphasis(d) for d in make_docs(sections, prose_paragraphs)]


def paradise_lost_docs(brotli_sdist: Path) -> list[str]:
    """Paradise Lost; the 1992 Project Gutenberg introduction before the title is dropped."""
    lines = clean_lines(read_from_tar(brotli_sdist, "tests/testdata/plrabn12.txt").decode("ascii"))
    lines = lines[lines.index("Paradise Lost") :]
    # Stray '$' marks survive from the 1960s punched-card encoding.
    lines = [s.replace("$ '", "'").replace("$?", "?").replace("$", " ") for s in lines]
    lines = [s for s in lines if not re.fullmatch(r"\s*\d{8}\s*", s)]  # three stray card numbers
    sections = split_chapters(lines, lambda s: bool(re.match(r"^Book [IVX]+$", s)))
    return make_docs(sections, verse_paragraphs)


def as_you_like_it_docs(brotli_sdist: Path) -> list[str]:
    """As You Like It, one document per scene; the dramatis personae table is dropped."""
    lines = clean_lines(read_from_tar(brotli_sdist, "tests/testdata/asyoulik.txt").decode("ascii"))
    body = [s for s in lines[lines.index("ACT I") :] if s.strip() != "AS YOU LIKE IT"]  # running header
    lines = ["AS YOU LIKE IT", ""] + body
    sections = split_chapters(lines, lambda s: bool(re.match(r"^ACT [IVX]+$", s)))
    return make_docs(sections, play_paragraphs)


def botchan_docs(sentencepiece_sdist: Path) -> list[str]:
    """Botchan (tr. Morri, 1919), Gutenberg #8868; PG header, credits and licence removed."""
    lines = clean_lines(read_from_tar(sentencepiece_sdist, "test/botchan.txt").decode("utf-8"))
    start = next(i for i, s in enumerate(lines) if s.startswith("*** START OF")) + 1
    end = lines.index("--(THE END)--") + 1  # after it: transcriber's notes, then the PG licence
    lines = [s for s in lines[start:end] if not s.startswith("Produced by")]
    lines = [re.sub(r" ?\[[A-Z]\]", "", s) for s in lines]  # markers pointing at those notes
    sections = split_chapters(lines, lambda s: bool(re.match(r"^CHAPTER [IVX]+\.?$", s)))
    return make_docs(sections, reflow_unbroken)


def devil_docs(deb: Path) -> list[str]:
    """The Devil's Dictionary: the preface, then one document per initial letter."""
    raw = gzip.decompress(read_from_deb(deb, "usr/share/dictd/devil.dict.dz")).decode("latin-1")
    lines = clean_lines(raw)
    lines = lines[next(i for i, s in enumerate(lines) if s.strip() == "PREFACE") :]
    lines = [s for s in lines if s.strip() != "abcdefghijklmnopqrstuvwxyz"]  # dictd metadata entry
    lines = [re.sub(r"\{([^}]*)\}", r"\1", s) for s in lines]  # dictd cross-references {WORD}
    sections: list[list[str]] = [[]]
    letter, previous = "", ""
    for line in lines:
        m = re.match(r"^([A-Z])[A-Z'\-. ]*, ", line)  # an entry: "ABASEMENT, n.  A decent ..."
        starts_block = not previous.strip()
        previous = line
        if m and starts_block and m.group(1) > letter:
            letter = m.group(1)
            sections.append([])
        sections[-1].append(line)
    return [strip_emphasis(d) for d in make_docs(sections, prose_paragraphs)]


def build_corpus(args: argparse.Namespace) -> None:
    parts = {
        "austen": austen_docs(args.janeaustenr_deb),
        "alice": alice_docs(args.brotli_sdist),
        "botchan": botchan_docs(args.sentencepiece_sdist),
        "paradise_lost": paradise_lost_docs(args.brotli_sdist),
        "as_you_like_it": as_you_like_it_docs(args.brotli_sdist),
        "devil": devil_docs(args.devil_deb),
    }
    docs = [d for part in parts.values() for d in part if d.strip()]
    for name, part in parts.items():
        print(f"{name:>16}: {len(part):4d} docs, {sum(len(d.encode()) for d in part):9,d} bytes")
    write_documents(docs, args.out)
    print(f"wrote {args.out}: {len(docs)} docs, {args.out.stat().st_size:,d} bytes compressed")


# --------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------


def train_tokenizer(args: argparse.Namespace) -> None:
    docs = read_documents(args.corpus)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=[EOS_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    assert tokenizer.get_vocab_size() == args.vocab_size
    tokenizer.save(str(args.out))

    encodings = tokenizer.encode_batch(docs)
    for doc, enc in zip(docs, encodings):
        assert tokenizer.decode(enc.ids) == doc, "round trip failed"
    n_tokens = sum(len(e.ids) for e in encodings)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"wrote {args.out}: vocab {tokenizer.get_vocab_size()}, {EOS_TOKEN} = 0")
    print(
        f"{len(docs)} docs, {n_bytes:,d} bytes, {n_tokens:,d} tokens (+{len(docs)} EOS), "
        f"{n_tokens / n_bytes:.4f} tokens/byte"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="extract corpus.txt.gz from the downloaded packages")
    corpus.add_argument("--brotli-sdist", type=Path, required=True)
    corpus.add_argument("--sentencepiece-sdist", type=Path, required=True)
    corpus.add_argument("--janeaustenr-deb", type=Path, required=True)
    corpus.add_argument("--devil-deb", type=Path, required=True)
    corpus.add_argument("--out", type=Path, default=CORPUS_PATH)
    tok = sub.add_parser("tokenizer", help="train tokenizer.json on corpus.txt.gz")
    tok.add_argument("--corpus", type=Path, default=CORPUS_PATH)
    tok.add_argument("--out", type=Path, default=TOKENIZER_PATH)
    tok.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    inputs = ("brotli_sdist", "sentencepiece_sdist", "janeaustenr_deb", "devil_deb") if args.command == "corpus" \
        else ("corpus",)
    for dest in inputs:
        if not getattr(args, dest).is_file():
            parser.error(f"--{dest.replace('_', '-')}={getattr(args, dest)}: no such file")
    if args.command == "tokenizer" and args.vocab_size <= 256:
        parser.error(f"--vocab-size={args.vocab_size}: must be > 256 (the 256 byte tokens and {EOS_TOKEN})")
    try:  # a probe file beside --out (as root, os.access says yes to everything)
        if args.out.is_dir():
            raise IsADirectoryError(21, "a directory")
        with tempfile.TemporaryFile(dir=args.out.absolute().parent):
            pass
    except OSError as e:
        parser.error(f"--out={args.out}: cannot write this file ({e.strerror}); give a file in a writable directory")
    {"corpus": build_corpus, "tokenizer": train_tokenizer}[args.command](args)


if __name__ == "__main__":
    main()
