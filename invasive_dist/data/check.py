"""The data check: everything that can be wrong with a data folder, found in one pass, each named.

    report = check_data(Path("data/kaggle"))                  # or cached_check(..., cache_dir=...)
    print(report.format())                                    # counts, then one line per problem
    report.require("train", on_bad_file="skip")               # UserError if training cannot start
    index = index.subset([i for i, n in enumerate(index.names) if n not in report.bad_names])

``invasive-dist check-data`` prints the report and exits non-zero when ``report.ok`` is False;
``train`` runs the (cached) check before it starts and ``predict`` needs the ``test-`` part clean.

What is checked (``Problem.kind``; fatal unless marked *warning*):

- the label file: ``missing-root``, ``missing-labels``, ``labels-unreadable`` (not UTF-8 text),
  ``labels-header`` (not exactly ``name,invasive``), ``labels-empty``, ``labels-row`` (not two
  fields), ``bad-label`` (not 0 or 1), ``duplicate-name``, ``bad-name`` (not an integer);
- every labelled image: ``missing-file``, ``empty-file``, ``not-jpeg`` (no FF D8 FF magic: a PNG or
  text under a .jpg name), ``truncated`` (no end-of-image marker, or the decoder ran out of data),
  ``corrupt`` (any other decode failure), ``unreadable`` (the file cannot be read),
  ``trailing-data`` (*warning*: bytes after the end-of-image marker, ignored by the decoders),
  ``cmyk`` / ``grayscale`` (a *warning* with ``grayscale_cmyk="convert"``: the decoders convert to
  RGB; fatal with ``"error"``), ``exif-rotated`` (*warning*: the torch decoder applies it),
  ``exif-unreadable`` (*warning*);
- ``unlabelled-file`` (*warning*): a .jpg in train/ without a label row is not used;
- the test set, listed by ``sample_submission.csv`` (or test/ when it is absent): the same image
  checks and file/name checks with a ``test-`` prefix (``test-missing`` when there is no test set).

Damaged in the middle: an end-of-image marker inside the compressed data with more image data after
it (e.g. markers written over the middle of the file) is ``corrupt`` (:func:`premature_end`): Pillow
decodes such a file without an error, the rest of it grey, and libjpeg only warns. Not detected: a
file cut short whose remains end in an end-of-image marker by chance (or were "repaired" by
appending one), which decodes with grey rows at the bottom in Pillow and torchvision alike. An
interrupted copy has no such marker and is found.

Per-image train problems (and rows with a non-integer name) put the name into ``bad_names``:
``data.on_bad_file=skip`` trains without those images. Problems with the label file itself (header,
labels, duplicates) cannot be skipped. A check never raises on bad input: whatever goes wrong with
one file becomes a Problem naming that file.

Speed: images are decoded with Pillow in a thread pool (the decoder releases the GIL). The 10 real
1154x866 images decode in about 18 ms each on one core, so the full 3,826-image competition set
takes roughly 35 s on 2 cores; ``cached_check`` skips all of it while no file's size or mtime
changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageFile

from ..distributed import usable_cores
from ..errors import UserError
from ..files import write_json
from ..progress import track
from .kaggle import NameRows, name_key, parse_name_csv
from .transforms import exif_orientation

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
CACHE_VERSION = 2  # bump when the checks change, so old cached reports are not trusted

# Kinds whose train name goes into bad_names (so on_bad_file=skip can exclude the image).
SKIPPABLE = frozenset(
    {
        "bad-name",
        "missing-file",
        "empty-file",
        "not-jpeg",
        "truncated",
        "corrupt",
        "unreadable",
        "cmyk",
        "grayscale",
    }
)
_SKIP_HINT = "fix or remove it, or set data.on_bad_file=skip to train without it"


@dataclass
class Problem:
    kind: str  # e.g. "truncated", "test-missing-file" (see the module docstring)
    path_or_name: str  # the sample's name for a listed image or row (as in bad_names), else the file
    message: str  # names the file and says what to do
    fatal: bool  # False: a warning, training and prediction still work


@dataclass
class CheckReport:
    root: str
    labels_csv: str
    n_label_rows: int = 0
    n_train_files: int = 0  # .jpg files in train/
    n_test_files: int = 0  # .jpg files in test/
    n_test_listed: int = 0  # rows of sample_submission.csv (or test/ files when it is absent)
    n_positive: int = 0
    n_negative: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_names: set[str] = field(default_factory=set)  # train names on_bad_file=skip excludes
    decoded: bool = True  # images were fully decoded (not only their headers)
    seconds: float = 0.0
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        """No fatal problem anywhere (train and test): the exit status of check-data."""
        return not any(p.fatal for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    def blocking(self, stage: Literal["train", "predict"], on_bad_file: str = "error") -> list[Problem]:
        """The fatal problems that stop ``stage``. For train, with ``on_bad_file="skip"``, the
        per-image problems are not blocking (their names are in ``bad_names``)."""
        if stage == "predict":
            return [p for p in self.errors if p.kind.startswith("test-")]
        out = [p for p in self.errors if not p.kind.startswith("test-")]
        if on_bad_file == "skip":
            out = [p for p in out if p.kind not in SKIPPABLE]
        return out

    def require(
        self, stage: Literal["train", "predict"], on_bad_file: str = "error", limit: int = 10
    ) -> None:
        """Raise UserError listing the blocking problems of ``stage`` (at most ``limit`` of them)."""
        blocking = self.blocking(stage, on_bad_file)
        if not blocking:
            return
        lines = [f"  {p.message}" for p in blocking[:limit]]
        if len(blocking) > limit:
            lines.append(f"  ... and {len(blocking) - limit} more")
        skippable = stage == "train" and on_bad_file != "skip" and all(p.kind in SKIPPABLE for p in blocking)
        hint = (
            "set data.on_bad_file=skip to train without these images, or fix them"
            if skippable
            else f"run `invasive-dist check-data --data {self.root}` for the full report"
        )
        raise UserError(
            f"{self.root}: {len(blocking)} data problem(s) stop {stage}:\n" + "\n".join(lines) + f"\n{hint}"
        )

    def format(self) -> str:
        lines = [
            f"data check of {self.root} (labels: {self.labels_csv}"
            f"{', images decoded' if self.decoded else ', headers only'}"
            f"{', cached result' if self.from_cache else ''})",
            f"  label rows: {self.n_label_rows} ({self.n_positive} invasive, {self.n_negative} not)",
            f"  train/ files: {self.n_train_files}   test/ files: {self.n_test_files} "
            f"({self.n_test_listed} listed for prediction)",
        ]
        n_err, n_warn = len(self.errors), len(self.warnings)
        if not self.problems:
            lines.append("OK: no problems found")
        else:
            verdict = "OK" if self.ok else "FAILED"
            lines.append(f"{verdict}: {n_err} error(s), {n_warn} warning(s)")
            if self.bad_names:
                lines.append(
                    f"  {len(self.bad_names)} train image(s) would be excluded with data.on_bad_file=skip"
                )
            for p in sorted(self.problems, key=lambda p: (not p.fatal, p.kind)):
                lines.append(f"{'ERROR' if p.fatal else 'WARN '} [{p.kind}] {p.message}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bad_names"] = sorted(self.bad_names)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckReport:
        d = dict(d)
        d["problems"] = [Problem(**p) for p in d.get("problems", [])]
        d["bad_names"] = set(d.get("bad_names", []))
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# The label file and the sample submission.


def _read_name_csv(path: Path, prefix: str, labelled: bool, problems: list[Problem]) -> NameRows | None:
    """The loader's own parser (``kaggle.parse_name_csv``): the check reports exactly what
    training would refuse. Problems go into ``problems``; None if the file is unusable."""
    rows = parse_name_csv(path, labelled)
    problems += [Problem(prefix + p.kind, p.key, p.message, True) for p in rows.problems]
    unusable = {"labels-unreadable", "labels-empty", "labels-header"}
    return None if any(p.kind in unusable for p in rows.problems) else rows


# ----------------------------------------------------------------------------------------------
# One image file.


def inspect_image(
    path: Path,
    decode: bool = True,
    grayscale_cmyk: str = "convert",
    prefix: str = "",
    name: str | None = None,
) -> list[Problem]:
    """Problems of one image file ([] when it is a good RGB JPEG). Never raises.

    ``name`` (the sample's name) becomes the problems' ``path_or_name``; the path otherwise."""
    key = str(path) if name is None else name
    try:
        return _inspect_image(path, decode, grayscale_cmyk, prefix, key)
    except Exception as e:  # a check must not crash on garbage; name the file instead
        msg = f"{path}: cannot be read as an image ({type(e).__name__}: {e}); {_SKIP_HINT}"
        return [Problem(prefix + "unreadable", key, msg, True)]


# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])


def premature_end(data: bytes) -> int | None:
    """The offset of an end-of-image marker that ends the compressed image data before the end of
    the file, when image data follows it and the file ends in another one: a file whose middle was
    overwritten (or two pieces joined). libjpeg stops at the first marker, only warns ("Corrupt JPEG
    data: premature end of data segment") and fills the rest with grey; Pillow shows no warning at
    all. None for a whole file, also one with a trailer after its end (an appended thumbnail starts
    with its own start-of-image marker; app trailers do not end in an end-of-image marker).

    Walks the segments (each marker's length) to the first scan, then the scan data, where 0xFF is
    only ever followed by 0x00 (a stuffed byte), a restart marker or the marker that ends the scan;
    progressive files repeat tables + scan until the end-of-image marker."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not a marker where one must be: leave it to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            rest = data[i + 2 :].rstrip(b"\x00")
            while rest.startswith(JPEG_EOI):
                rest = rest[2:].rstrip(b"\x00")
            if rest and not rest.startswith(JPEG_MAGIC[:2]) and rest.endswith(JPEG_EOI):
                return i
            return None
        if marker in _STANDALONE:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker != 0xDA:  # not a start of scan
            continue
        while True:  # the scan's data: to the next marker that is not a restart marker
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= n:
                return None
            nxt = data[i + 1]
            if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                i += 1 if nxt == 0xFF else 2
                continue
            break
    return None


def _inspect_image(path: Path, decode: bool, grayscale_cmyk: str, prefix: str, key: str) -> list[Problem]:
    def problem(kind: str, message: str, fatal: bool = True) -> list[Problem]:
        return [Problem(prefix + kind, key, f"{path}: {message}", fatal)]

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return problem("missing-file", f"image file is missing; add it or remove its row ({_SKIP_HINT})")
    except OSError as e:
        return problem(
            "unreadable", f"cannot read the file ({e.strerror or e}); check permissions, {_SKIP_HINT}"
        )
    if not data:
        return problem(
            "empty-file", f"the file is empty (0 bytes; an interrupted copy?); copy it again or {_SKIP_HINT}"
        )
    if not data.startswith(JPEG_MAGIC):
        kind = _sniff(data)
        return problem(
            "not-jpeg",
            f"is not a JPEG (starts like {kind}); convert it to JPEG or {_SKIP_HINT}",
        )
    # The end-of-image marker ends every complete JPEG (some cameras pad after it with zeros, some
    # apps append data). Without it at the end, only a full decode tells a trailer from truncation.
    ends_ok = data.rstrip(b"\x00").endswith(JPEG_EOI)
    if not ends_ok and (not decode or JPEG_EOI not in data):
        return problem(
            "truncated",
            f"JPEG is truncated ({len(data)} bytes, no end-of-image marker); copy it again or {_SKIP_HINT}",
        )
    early = premature_end(data) if decode and ends_ok else None
    if early is not None:
        return problem(
            "corrupt",
            f"JPEG image data is damaged: an end-of-image marker at byte {early} of {len(data)}, inside the "
            "compressed image data, stops the decoders there (the rest decodes as flat grey, with no error "
            f"from Pillow; GPU decoders may refuse it); copy it again or {_SKIP_HINT}",
        )
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return problem("not-jpeg", f"is a {im.format} image, not a JPEG; convert it or {_SKIP_HINT}")
            mode, (w, h) = im.mode, im.size
            try:
                orientation = exif_orientation(im)
                exif_error = ""
            except Exception as e:  # a broken EXIF block does not make the pixels unusable
                orientation, exif_error = None, str(e) or type(e).__name__
            if decode:
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt data
        text = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        return problem(kind, f"JPEG cannot be decoded ({text}); copy it again or {_SKIP_HINT}")

    out: list[Problem] = []
    if not ends_ok:
        out += problem(
            "trailing-data",
            f"has {len(data) - data.rfind(JPEG_EOI) - 2} bytes after the JPEG end-of-image marker; "
            "the decoders ignore them (nothing to do)",
            fatal=False,
        )
    if mode in ("CMYK", "L"):
        kind, desc = ("cmyk", "CMYK") if mode == "CMYK" else ("grayscale", "grayscale (1 channel)")
        if grayscale_cmyk == "error":
            out += problem(kind, f"JPEG is {desc}, not RGB; convert it to RGB or {_SKIP_HINT}")
        else:
            out += problem(
                kind, f"JPEG is {desc}; the decoders convert it to RGB (nothing to do)", fatal=False
            )
    elif mode != "RGB":
        out += problem("corrupt", f"JPEG has colour mode {mode}, not RGB; convert it to RGB or {_SKIP_HINT}")
    if exif_error:
        out += problem(
            "exif-unreadable",
            f"its EXIF metadata cannot be parsed ({exif_error}); the pixels decode, so it is used "
            "as stored (re-save it without EXIF if it looks rotated)",
            fatal=False,
        )
    if orientation not in (None, 1):  # None: the EXIF block could not be read
        out += problem(
            "exif-rotated",
            f"EXIF orientation is {orientation} (stored rotated/flipped, {w}x{h} as stored); the torch "
            "decoder applies the orientation, so the image is used upright (nothing to do)",
            fatal=False,
        )
    return out


def _sniff(data: bytes) -> str:
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return "a PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF"
    if head.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "a WebP"
    if head.startswith(b"BM"):
        return "a BMP"
    if head.lstrip().startswith((b"<", b"{")):
        return "HTML/XML/JSON text"
    try:
        head.decode("ascii")
        return f"text {head[:12].decode('ascii')!r}"
    except UnicodeDecodeError:
        return f"bytes {head[:4].hex(' ')}"


# ----------------------------------------------------------------------------------------------
# The whole folder.


def _jpg_names(folder: Path) -> list[str]:
    try:
        return [
            e.name[:-4] for e in os.scandir(folder) if e.name.endswith(".jpg") and not e.name.startswith(".")
        ]
    except OSError:
        return []


def _unlisted(folder: Path, names: set[str], kind: str, what: str) -> list[Problem]:
    """Warnings for image files that no CSV row lists, in name order."""
    return [
        Problem(kind, str(folder / f"{n}.jpg"), f"{folder / f'{n}.jpg'}: {what}", False)
        for n in sorted(names, key=name_key)
    ]


def check_data(
    root: Path,
    labels_csv: str = "train_labels.csv",
    decode: bool = True,
    grayscale_cmyk: Literal["convert", "error"] = "convert",
    workers: int = 0,
) -> CheckReport:
    """Check a data folder in the Kaggle layout; see the module docstring for what is checked.

    ``decode=False`` reads only headers and end markers (fast, misses corrupt entropy data).
    ``workers`` is the thread count (0: one per core this process may use, at most 16)."""
    t0 = time.perf_counter()
    root = Path(root)
    report = CheckReport(root=str(root), labels_csv=labels_csv, decoded=decode)
    problems = report.problems
    if not root.is_dir():
        problems.append(
            Problem(
                "missing-root",
                str(root),
                f"{root}: data folder does not exist; point data.root at the Kaggle data "
                f"(train/, test/, {labels_csv}) or create one with `invasive-dist synth --out {root}`",
                True,
            )
        )
        report.seconds = time.perf_counter() - t0
        return report

    train_dir, test_dir = root / "train", root / "test"
    train_files = set(_jpg_names(train_dir))
    test_files = set(_jpg_names(test_dir))
    report.n_train_files, report.n_test_files = len(train_files), len(test_files)

    # Train labels.
    labels_path = root / labels_csv
    rows: NameRows | None = None
    if not labels_path.is_file():
        problems.append(
            Problem(
                "missing-labels",
                str(labels_path),
                f"{labels_path}: label file not found; put the Kaggle train_labels.csv there "
                "or set data.labels_csv to its name",
                True,
            )
        )
    else:
        rows = _read_name_csv(labels_path, "", True, problems)
    label_names = rows.names if rows else []
    if rows:
        report.n_label_rows = len(rows.names)
        report.n_positive = sum(1 for v in rows.labels if v == 1)
        report.n_negative = sum(1 for v in rows.labels if v == 0)
        report.bad_names.update(rows.bad_names)
        problems += _unlisted(
            train_dir,
            train_files - set(label_names),
            "unlabelled-file",
            f"has no row in {labels_csv}, so it is not used; add a row or remove the file",
        )

    # Test set: the sample submission's names, or the files in test/ when it is absent.
    sub_path = root / "sample_submission.csv"
    test_names: list[str] = []
    if sub_path.is_file():
        sub = _read_name_csv(sub_path, "test-", False, problems)
        test_names = sub.names if sub else []
        problems += _unlisted(
            test_dir,
            test_files - set(test_names),
            "test-unlisted-file",
            f"not listed in {sub_path.name}, so no prediction is made for it; add a row or remove the file",
        )
    elif test_files:
        test_names = sorted(test_files, key=name_key)
    else:
        problems.append(
            Problem(
                "test-missing",
                str(root),
                f"{root}: neither sample_submission.csv nor test/*.jpg found, so `predict` has nothing "
                "to predict; add the Kaggle test/ folder and sample_submission.csv",
                True,
            )
        )
    report.n_test_listed = len(test_names)

    # Images, in a thread pool: Pillow releases the GIL while it decodes.
    jobs = [(train_dir / f"{n}.jpg", n, "") for n in label_names]
    jobs += [(test_dir / f"{n}.jpg", n, "test-") for n in test_names]
    n_threads = workers or min(16, usable_cores())

    def run(job: tuple[Path, str, str]) -> list[Problem]:
        path, name, prefix = job
        return inspect_image(path, decode, grayscale_cmyk, prefix, name)

    # Truncated data must fail to decode: set Pillow's global switch to its default for the check
    # if someone enabled it (here, not per thread: the threads share it).
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
            results = list(track(pool.map(run, jobs), "data check", total=len(jobs), unit="img"))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    for (_, name, prefix), found in zip(jobs, results):
        problems.extend(found)
        if not prefix and any(p.fatal and p.kind in SKIPPABLE for p in found):
            report.bad_names.add(name)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------
# Caching by file sizes and mtimes.


def fingerprint(root: Path, labels_csv: str, **kw: Any) -> str:
    """Hash of every image's (path, size, mtime_ns), the CSVs' size/mtime and the check options.

    Listing and stat-ing the files takes milliseconds where decoding them takes minutes."""
    root = Path(root)
    h = hashlib.sha256()
    kw.pop("workers", None)  # does not change the result
    h.update(
        json.dumps(
            {"version": CACHE_VERSION, "root": str(root.resolve()), "labels_csv": labels_csv, **kw},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for rel in (labels_csv, "sample_submission.csv"):
        try:
            st = (root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0absent\n".encode())
    for split in ("train", "test"):
        try:
            entries = sorted(os.scandir(root / split), key=lambda e: e.name)
        except OSError:
            h.update(f"{split}/\0absent\n".encode())
            continue
        for e in entries:
            try:
                st = e.stat()
                h.update(f"{split}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{split}/{e.name}\0unstat\n".encode())
    return h.hexdigest()


def cached_check(root: Path, labels_csv: str, cache_dir: Path, **kw: Any) -> CheckReport:
    """``check_data`` unless an earlier report of the same files and options is in ``cache_dir``.

    One cache file per (data folder, label file); its fingerprint must match exactly."""
    root = Path(root)
    cache_dir = Path(cache_dir)
    key = hashlib.sha256(f"{root.resolve()}\0{labels_csv}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"data-check-{key}.json"
    fp = fingerprint(root, labels_csv, **kw)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("fingerprint") == fp:
            report = CheckReport.from_json(cached["report"])
            report.from_cache = True
            return report
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or an unreadable one: check again and rewrite it
    report = check_data(root, labels_csv, **kw)
    if report.problems and any(p.kind == "missing-root" for p in report.problems):
        return report  # nothing worth caching
    try:
        write_json(cache_file, {"fingerprint": fp, "report": report.to_json()}, indent=1)
    except OSError:
        pass  # a read-only cache folder only costs the next check its time
    return report
