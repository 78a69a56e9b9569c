"""Write small data sets in the exact GroupLens layouts (MovieLens files are never committed).

The numbers are random but the byte layout follows each release's README: separators,
header rows, encodings (ml-100k and ml-1m are latin-1), genre encodings and title years.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip
OCCUPATIONS = ["administrator", "artist", "doctor", "educator", "engineer", "student", "writer"]


@dataclass
class Toy:
    users: list[tuple[int, str, int, str, str]]  # id, gender, age, occupation, zip
    items: list[tuple[int, str, int, list[str]]]  # id, title (no year), year, genres
    ratings: list[tuple[int, int, float, int]]  # user, item, rating, ts


def toy(n_users: int = 40, n_items: int = 60, per_user: int = 25, seed: int = 0,
        half_stars: bool = False) -> Toy:  # fmt: skip
    rng = random.Random(seed)
    users = [(u, rng.choice("MF"), rng.choice([1, 18, 25, 35, 45, 50, 56]),
              rng.choice(OCCUPATIONS), f"{rng.randint(10000, 99999)}")
             for u in range(1, n_users + 1)]  # fmt: skip
    items = [(i, f"Film {i}" + (", The" if i % 7 == 0 else "") + (" Café" if i == 3 else ""),
              rng.randint(1930, 2015), rng.sample(GENRES, rng.randint(1, 3)))
             for i in range(1, n_items + 1)]  # fmt: skip
    ratings = []
    for u in range(1, n_users + 1):
        t = 880_000_000 + rng.randint(0, 10_000_000)
        for i in rng.sample(range(1, n_items + 1), per_user):
            t += rng.randint(1, 5000)
            r = rng.choice([0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5]) if half_stars else rng.randint(1, 5)
            ratings.append((u, i, float(r), t))
    return Toy(users, items, ratings)


def _fmt_rating(r: float, half_stars: bool) -> str:
    return f"{r:.1f}" if half_stars else str(int(r))


def write_ml100k(root: Path, data: Toy) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in data.ratings))
    (root / "u.user").write_text("".join(f"{u}|{age}|{g}|{occ}|{z}\n" for u, g, age, occ, z in data.users))
    lines = []
    for i, title, year, genres in data.items:
        flags = ["0"] + ["1" if g in genres else "0" for g in GENRES]
        lines.append(f"{i}|{title} ({year})|01-Jan-{year}||http://x/{i}|" + "|".join(flags) + "\n")
    (root / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return root


def write_ml1m(root: Path, data: Toy, with_users: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in data.ratings))
    if with_users:
        (root / "users.dat").write_text(
            "".join(
                f"{u}::{g}::{age}::{k % 21}::{z}\n" for k, (u, g, age, occ, z) in enumerate(data.users)
            )  # fmt: skip
        )
    (root / "movies.dat").write_bytes(
        "".join(f"{i}::{t} ({y})::{'|'.join(g)}\n" for i, t, y, g in data.items).encode("latin-1")
    )
    return root


def write_ml_latest(root: Path, data: Toy) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in data.ratings)
    )
    rows = []
    for i, title, year, genres in data.items:
        name = f"{title} ({year})"
        if "," in name:
            name = f'"{name}"'
        rows.append(f"{i},{name},{'|'.join(genres) if i % 11 else '(no genres listed)'}\n")
    (root / "movies.csv").write_text("movieId,title,genres\n" + "".join(rows), encoding="utf-8")
    (root / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
    (root / "links.csv").write_text("movieId,imdbId,tmdbId\n")
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent))
    return archive
