"""MovieLens as a DIN dataset (the project's reference benchmark).

Samples: per user, ratings sorted by (timestamp, item_id); every rating with at least one
earlier rating is a sample with user_id, item_id, the item's first genre, gender, age,
occupation, the previous up to `history_len` item ids and their first genres (most recent last),
and label ``rating >= 4``. A user with m samples puts the first ``floor(0.8 m)`` in train and the
last ``ceil(0.2 m)`` in test; validation is the last ``ceil(0.1 n)`` of each user's n train
samples. MovieLens-100K gives 99,057 samples: 78,870 train (validation included), 20,187 test.

Sources: the RecBole copy of ml-100k (atomic files from the PyPI wheel ``recbole==1.2.1``,
fetched by `ensure_movielens_100k`; RecBole itself is never imported), a GroupLens ``ml-100k``
folder or zip, and a GroupLens ``ml-1m`` folder or zip. "First genre" is the first genre of the
item in GroupLens order (unknown, Action, Adventure, ...), whatever the source.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from data.batch import DatasetSplits
from data.cache import SPLITS, Processed, cache_key, data_root, entry_dir, fingerprint, load_or_build
from data.reader import scan_lines
from data.vocab import OOV_ID, Vocabulary
from embtab.config import FeatureSpec
from embtab.files import atomic_write_bytes

GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_FILES: tuple[str, ...] = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
GROUPLENS_100K_FILES: tuple[str, ...] = ("u.data", "u.item", "u.user")
GROUPLENS_1M_FILES: tuple[str, ...] = ("ratings.dat", "movies.dat", "users.dat")
USER_FEATURES: tuple[str, ...] = ("gender", "age", "occupation")
RATING_FIELDS: tuple[str, ...] = ("user_id", "item_id", "rating", "timestamp")
U_ITEM_FIELDS: tuple[str, ...] = (
    "item_id", "title", "release", "video_release", "url", *(f"flag_{i}" for i in range(19))
)  # fmt: skip
U_USER_FIELDS: tuple[str, ...] = ("user_id", "age", "gender", "occupation", "zip_code")
ML1M_MOVIE_FIELDS: tuple[str, ...] = ("item_id", "title", "genres")
ML1M_USER_FIELDS: tuple[str, ...] = ("user_id", "gender", "age", "occupation", "zip_code")

Source = Path | bytes


@dataclass(frozen=True)
class MovieLensTables:
    """Raw MovieLens tables in one layout, whatever the source format.

    Attributes:
        ratings: user_id (i64), item_id (i64), rating (f64), timestamp (i64).
        items: item_id (i64), genre (str: the first genre in GroupLens order, null if none).
        users: user_id (i64), gender (str), age (i64), occupation (str).
    """

    ratings: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame


def ensure_movielens_100k(cache_dir: str | Path | None = None) -> Path:
    """Folder holding RecBole's ml-100k atomic files, downloading them if missing.

    The files come from the PyPI wheel ``recbole==1.2.1`` (``pip download`` with this Python)
    and are extracted with `zipfile` (each written to a temporary name, then renamed). Default
    folder: ``<data_root()>/ml-100k`` (``$EMBTAB_DATA_DIR`` or ``~/.cache/embtab``).
    """
    folder = Path(cache_dir) if cache_dir is not None else data_root() / "ml-100k"
    if all((folder / name).is_file() for name in RECBOLE_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--disable-pip-version-check", RECBOLE_REQUIREMENT, "-d", tmp),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {RECBOLE_REQUIREMENT} (needed for MovieLens-100K): "
                f"{' '.join(command)} exited with {result.returncode}: {result.stderr[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in RECBOLE_FILES:
                atomic_write_bytes(folder / name, wheel.read(RECBOLE_MEMBER_DIR + name))
    return folder


def load_movielens_100k(
    path: str | Path | None = None, cache_dir: str | Path | None = None, history_len: int = 20
) -> DatasetSplits:
    """MovieLens-100K as DIN splits.

    Args:
        path: None for the offline RecBole copy (see `ensure_movielens_100k`), else a GroupLens
            ``ml-100k`` folder or ``ml-100k.zip``.
        cache_dir: data cache root (default `data_root()`): the RecBole files go to
            ``<root>/ml-100k``, the processed splits to ``<root>/processed``.
        history_len: longest history kept per sample.
    """
    root = Path(cache_dir) if cache_dir is not None else data_root()
    if path is None:
        folder = ensure_movielens_100k(root / "ml-100k")
        files = [folder / name for name in RECBOLE_FILES]
        return _load("movielens-100k", files, lambda: read_recbole_100k(folder), root, history_len)
    files = _source_files(Path(path), GROUPLENS_100K_FILES)
    return _load("movielens-100k", files, lambda: read_grouplens_100k(path), root, history_len)


def load_movielens_1m(
    path: str | Path, cache_dir: str | Path | None = None, history_len: int = 20
) -> DatasetSplits:
    """MovieLens-1M (a GroupLens ``ml-1m`` folder or ``ml-1m.zip``) as DIN splits."""
    root = Path(cache_dir) if cache_dir is not None else data_root()
    files = _source_files(Path(path), GROUPLENS_1M_FILES)
    return _load("movielens-1m", files, lambda: read_grouplens_1m(path), root, history_len)


def _load(
    name: str, files: list[Path], read: Callable[[], MovieLensTables], root: Path, history_len: int
) -> DatasetSplits:
    if history_len < 1:
        raise ValueError(f"{name}: history_len must be >= 1, got {history_len}")
    key = cache_key(dataset=name, sources=fingerprint(files), history_len=history_len)
    return load_or_build(entry_dir(root, name, key), key, lambda: din_dataset(name, read(), history_len)).splits()


def read_recbole_100k(folder: str | Path) -> MovieLensTables:
    """Read RecBole's ml-100k atomic files (tab separated, typed headers such as
    ``user_id:token``); genres are space-separated class tokens."""
    folder = Path(folder)
    inter = _read_fields(folder / "ml-100k.inter", str(folder / "ml-100k.inter"), "\t")
    item = _read_fields(folder / "ml-100k.item", str(folder / "ml-100k.item"), "\t")
    user = _read_fields(folder / "ml-100k.user", str(folder / "ml-100k.user"), "\t")
    genre = _first_genre(_genre_tokens(item, "class", " ", str(folder / "ml-100k.item")))
    return MovieLensTables(
        ratings=_ratings(inter, str(folder / "ml-100k.inter")),
        items=_items(item, str(folder / "ml-100k.item"), genre),
        users=_users(user, str(folder / "ml-100k.user")),
    )


def read_grouplens_100k(path: str | Path) -> MovieLensTables:
    """Read GroupLens ml-100k (folder or zip): ``u.data`` (tab: user item rating timestamp),
    ``u.item`` (pipe, latin-1, 5 fields then 19 genre flags), ``u.user`` (pipe:
    id|age|gender|occupation|zip)."""
    sources = _sources(Path(path), GROUPLENS_100K_FILES)
    where = {name: f"{path}:{name}" for name in GROUPLENS_100K_FILES}
    ratings = _read_fields(sources["u.data"], where["u.data"], "\t", RATING_FIELDS)
    item = _read_fields(sources["u.item"], where["u.item"], "|", U_ITEM_FIELDS)
    user = _read_fields(sources["u.user"], where["u.user"], "|", U_USER_FIELDS)
    flags = U_ITEM_FIELDS[5:]
    genre = pl.coalesce([pl.when(pl.col(f) == 1).then(pl.lit(g)) for f, g in zip(flags, GENRES)])
    return MovieLensTables(
        ratings=_ratings(ratings, where["u.data"]),
        items=_items(item, where["u.item"], genre, {f: pl.Int8 for f in flags}),
        users=_users(user, where["u.user"]),
    )


def read_grouplens_1m(path: str | Path) -> MovieLensTables:
    """Read GroupLens ml-1m (folder or zip): ``ratings.dat`` (UserID::MovieID::Rating::Timestamp),
    ``movies.dat`` (MovieID::Title::Genres with genres like ``Action|Comedy``), ``users.dat``
    (UserID::Gender::Age::Occupation::Zip-code)."""
    sources = _sources(Path(path), GROUPLENS_1M_FILES)
    where = {name: f"{path}:{name}" for name in GROUPLENS_1M_FILES}
    ratings = _read_fields(sources["ratings.dat"], where["ratings.dat"], "::", RATING_FIELDS)
    movies = _read_fields(sources["movies.dat"], where["movies.dat"], "::", ML1M_MOVIE_FIELDS)
    users = _read_fields(sources["users.dat"], where["users.dat"], "::", ML1M_USER_FIELDS)
    genre = _first_genre(_genre_tokens(movies, "genres", "|", where["movies.dat"]))
    return MovieLensTables(
        ratings=_ratings(ratings, where["ratings.dat"]),
        items=_items(movies, where["movies.dat"], genre),
        users=_users(users, where["users.dat"]),
    )


def din_dataset(name: str, tables: MovieLensTables, history_len: int = 20) -> Processed:
    """Build the DIN samples, their split and vocabularies from raw MovieLens tables."""
    vocabs = _vocabularies(tables)
    items = tables.items.select(
        vocabs["item_id"].encode(pl.col("item_id")), vocabs["item_genre"].encode(pl.col("genre"))
    )
    users = tables.users.select(
        vocabs["user_id"].encode(pl.col("user_id")),
        *[vocabs[f].encode(pl.col(f)) for f in USER_FEATURES],
    )
    genre_of = functools.partial(_lookup, old=items["item_id"], new=items["genre"])
    frame = _histories(tables.ratings, vocabs, history_len).select(
        "user_id",
        "item_id",
        genre_of(pl.col("item_id")).alias("item_genre"),
        *[_lookup(pl.col("user_id"), users["user_id"], users[f]).alias(f) for f in USER_FEATURES],
        "hist_item_ids",
        pl.col("hist_item_ids").list.eval(genre_of(pl.element())).alias("hist_genres"),
        label=(pl.col("rating") >= 4).cast(pl.Float32),
        split=_split_code(pl.col("position") - 1, pl.col("per_user")),
    )
    frames = {s: frame.filter(pl.col("split") == i).drop("split") for i, s in enumerate(SPLITS)}
    return Processed(name, _feature_specs(vocabs), (), "label", frames, tuple(vocabs.values()))


def _histories(
    ratings: pl.DataFrame, vocabs: dict[str, Vocabulary], history_len: int
) -> pl.DataFrame:
    """Ratings with encoded ids, sorted per user by (timestamp, item_id), each with its position,
    its user's sample count and the up to `history_len` previous items (most recent last);
    a user's first rating, which has no history, is dropped."""
    item = pl.col("item_id")
    return (
        ratings.sort("user_id", "timestamp", "item_id")
        .with_columns(vocabs["item_id"].encode(item))
        .with_columns(
            vocabs["user_id"].encode(pl.col("user_id")),
            position=pl.int_range(pl.len()).over("user_id"),
            per_user=pl.len().over("user_id") - 1,
            hist_item_ids=pl.concat_list(
                [item.shift(k).over("user_id") for k in range(history_len, 0, -1)]
            ).list.drop_nulls(),
        )
        .filter(pl.col("position") >= 1)
    )


def _split_code(index: pl.Expr, samples: pl.Expr) -> pl.Expr:
    """0 train, 1 valid, 2 test for a user's `index`-th of `samples` samples (integer maths)."""
    n_train = (samples * 8) // 10
    n_valid = (n_train + 9) // 10
    return (
        pl.when(index >= n_train).then(2).when(index >= n_train - n_valid).then(1).otherwise(0)
    ).cast(pl.Int8)


def _lookup(keys: pl.Expr, old: pl.Series, new: pl.Series) -> pl.Expr:
    """Map encoded ids through a table (OOV for ids the table lacks)."""
    return keys.replace_strict(old, new, default=OOV_ID, return_dtype=new.dtype)


def _vocabularies(tables: MovieLensTables) -> dict[str, Vocabulary]:
    """Vocabularies of every table, built from the item and user files (min count 1)."""
    return {
        "user_id": Vocabulary.from_values("user_id", tables.users["user_id"]),
        "item_id": Vocabulary.from_values("item_id", tables.items["item_id"]),
        "item_genre": Vocabulary.from_values("item_genre", tables.items["genre"]),
        **{f: Vocabulary.from_values(f, tables.users[f]) for f in USER_FEATURES},
    }


def _feature_specs(vocabs: dict[str, Vocabulary]) -> tuple[FeatureSpec, ...]:
    single = ("user_id", "item_id", "item_genre", *USER_FEATURES)
    return (
        *[FeatureSpec(f, vocabs[f].size, required=True) for f in single],
        FeatureSpec("hist_item_ids", vocabs["item_id"].size, pooling="none", table="item_id"),
        FeatureSpec("hist_genres", vocabs["item_genre"].size, pooling="none", table="item_genre"),
    )


def _source_files(path: Path, names: Sequence[str]) -> list[Path]:
    """Files whose sizes and mtimes key the cache: a zip itself, or the folder's named files."""
    if zipfile.is_zipfile(path):
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a folder holding {list(names)} or a zip of them")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: folder lacks {missing}; expected {list(names)}")
    return [path / n for n in names]


def _sources(path: Path, names: Sequence[str]) -> dict[str, Source]:
    """Each named file of a folder (its path) or of a zip (its bytes, found by base name)."""
    if not zipfile.is_zipfile(path):
        return dict(zip(names, _source_files(path, names)))
    with zipfile.ZipFile(path) as archive:
        members = {Path(m).name: m for m in archive.namelist() if "__MACOSX" not in m}
        missing = [n for n in names if n not in members]
        if missing:
            raise FileNotFoundError(f"{path}: zip lacks {missing}; expected members {list(names)}")
        return {n: archive.read(members[n]) for n in names}


def _read_fields(
    source: Source, where: str, separator: str, names: Sequence[str] | None = None
) -> pl.DataFrame:
    """String columns of a delimited file with exactly ``len(names)`` fields per line.

    `separator` may be several characters (``::``). Without `names` the first line is a RecBole
    header whose ``name:type`` fields name the columns. Adds ``line`` (1-based line numbers).
    """
    try:
        lines = scan_lines(source).with_row_index("line", offset=1).collect()
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"{where}: cannot read: {err}") from err
    if names is None:
        header = lines["text"][0] or ""
        names = [field.split(":")[0] for field in header.split(separator)]
        lines = lines.slice(1)
    fields = pl.col("text").fill_null("").str.split(separator)
    lines = lines.with_columns(fields=fields, count=fields.list.len())
    bad = lines.filter(pl.col("count") != len(names)).head(1)
    if len(bad):
        raise ValueError(
            f"{where}, line {bad['line'][0]}: {bad['count'][0]} fields separated by "
            f"{separator!r}, expected {len(names)} ({', '.join(names)}): {bad['text'][0]!r}"
        )
    return lines.select("line", pl.col("fields").list.to_struct(fields=list(names))).unnest(
        "fields"
    )


def _typed(frame: pl.DataFrame, where: str, dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    """Cast string columns to `dtypes`; ValueError naming the first value that does not parse."""
    missing = [c for c in dtypes if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}; found {frame.columns}")
    for column, dtype in dtypes.items():
        cast = frame[column].cast(dtype, strict=False)
        bad = cast.is_null().arg_true()
        if len(bad):
            row = int(bad[0])
            raise ValueError(
                f"{where}, line {frame['line'][row]}, column {column!r}: value "
                f"{frame[column][row]!r}, expected {dtype}"
            )
        frame = frame.with_columns(cast)
    return frame


def _unique_ids(frame: pl.DataFrame, column: str, where: str) -> pl.DataFrame:
    """`frame` after checking `column` holds no id twice."""
    duplicated = frame.filter(frame[column].is_duplicated())
    if len(duplicated):
        raise ValueError(
            f"{where}, line {duplicated['line'][0]}: {column} {duplicated[column][0]} appears "
            f"more than once; expected unique ids"
        )
    return frame


def _ratings(frame: pl.DataFrame, where: str) -> pl.DataFrame:
    dtypes = {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
    return _typed(frame, where, dtypes).select(list(dtypes))


def _users(frame: pl.DataFrame, where: str) -> pl.DataFrame:
    frame = _unique_ids(
        _typed(frame, where, {"user_id": pl.Int64, "age": pl.Int64}), "user_id", where
    )
    return frame.select("user_id", *USER_FEATURES)


def _items(
    frame: pl.DataFrame, where: str, genre: pl.Expr, dtypes: dict[str, pl.DataType] | None = None
) -> pl.DataFrame:
    """item_id and first genre of every item, after checking types and unique ids."""
    frame = _typed(frame, where, {"item_id": pl.Int64, **(dtypes or {})})
    return _unique_ids(frame, "item_id", where).select("item_id", genre=genre)


def _genre_tokens(items: pl.DataFrame, column: str, separator: str, where: str) -> pl.Expr:
    """Expression of each item's genre tokens, after checking every token is a known genre."""
    if column not in items.columns:
        raise ValueError(f"{where}: missing column {column!r}; found {items.columns}")
    tokens = (
        pl.col(column)
        .fill_null("")
        .str.split(separator)
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    unknown = (
        items.select("line", tokens.alias("g")).explode("g").filter(~pl.col("g").is_in(GENRES))
    )
    if len(unknown):
        raise ValueError(
            f"{where}, line {unknown['line'][0]}, column {column!r}: genre {unknown['g'][0]!r}, "
            f"expected one of {GENRES}"
        )
    return tokens


def _first_genre(tokens: pl.Expr) -> pl.Expr:
    """The first of an item's genre tokens in GroupLens order (null when it has none)."""
    return pl.coalesce([pl.when(tokens.list.contains(g)).then(pl.lit(g)) for g in GENRES])
