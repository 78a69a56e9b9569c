"""Pipeline settings, read once from environment variables.

Environment variables are the deployment interface: a scheduler, a container or a shell
sets them without touching code. Dagster run config can override the ingest and split
choices per run (see ``orchestration.assets``); everything else is process-wide.

| variable | default | meaning |
|---|---|---|
| ``RECSYS_HOME`` | ``<checkout>/.recsys_home`` | root of everything the pipeline writes |
| ``RECSYS_SOURCE`` | ``synthetic`` | ``synthetic`` \\| ``movielens`` \\| ``files`` |
| ``RECSYS_DATA_PATH`` | – | folder, zip or file read by ``movielens`` / ``files`` |
| ``RECSYS_COLUMN_MAP`` | – | ``files`` only: ``user_id=uid,item_id=sku,...`` |
| ``RECSYS_SPLIT`` | ``temporal`` | ``temporal`` \\| ``leave_last_out`` \\| ``stratified`` |
| ``RECSYS_VALID_FRAC`` / ``RECSYS_TEST_FRAC`` | 0.1 / 0.1 | split fractions |
| ``RECSYS_SPLIT_SEED`` | 42 | seed of the ``stratified`` split |
| ``RECSYS_HISTORY_LEN`` | 50 | length of behaviour histories in ``fct_ctr_samples`` |
| ``RECSYS_SYNTH_USERS`` / ``_ITEMS`` / ``_EVENTS`` / ``_SEED`` | 943 / 1682 / 100000 / 42 | synthetic size |
| ``RECSYS_MIN_EVENTS`` | 100 | fewest accepted interactions a contract allows |
| ``RECSYS_CONTRACT_MAX_ROWS`` | 1000000 | read by data_contracts: sample size for large tables |
| ``RECSYS_MODEL_CONFIG`` | – | TOML of per-family hyper-parameters over ``models/families.toml`` |
| ``RECSYS_BLESS_TOLERANCE`` | 0.02 | relative regression allowed against the last blessed version |
| ``RECSYS_MAX_CONCURRENT`` | 1 | steps run at once: 1 = one process per run (in-process executor) |
| ``RECSYS_DEVICE`` | ``auto`` | torch training: ``auto`` (CUDA if present) \\| ``cpu`` \\| ``cuda[:N]`` |
| ``RECSYS_TORCH_THREADS`` | 1 | CPU threads of torch training (BENCHMARKS.md, "Training threads") |
| ``RECSYS_PRECISION`` | ``auto`` | autocast: ``auto`` (CUDA bf16/fp16, CPU none) \\| ``fp32`` \\| ``bf16`` |
| ``RECSYS_STREAM_BUFFER_ROWS`` | 262144 | rows the streaming loader shuffles together (memory ~ this) |
| ``RECSYS_SPARSE_MIN_ROWS`` | 20000 | tables this large: sparse gradients, lazy Adam / LazySGD (0: none) |
| ``RECSYS_TRAIN_PROCS`` | 1 | processes per gradient-trained fit; > 1: DDP under ``torchrun`` |
| ``RECSYS_DUCKDB_MEMORY_LIMIT`` | ``2GB`` | DuckDB memory limit (it spills beyond) |
| ``RECSYS_WAREHOUSE`` | ``duckdb`` | where dbt builds: ``duckdb`` \| ``spark`` (warehouse_spark.py) |
| ``RECSYS_SPARK_MASTER`` / ``_DRIVER_MEMORY`` | ``local[2]`` / ``2g`` | the dbt profile's spark target |
| ``RECSYS_MAX_LINE_BYTES`` | 1048576 | longest line an input text file may have (longer: ingest stops) |
| ``RECSYS_MAX_UNPACK_BYTES`` | 8589934592 | most bytes a zip, ``.gz`` or parquet file may unpack to |
| ``RECSYS_MAX_ZIP_MEMBERS`` | 10000 | most members a MovieLens zip may hold (zip-bomb guard) |
| ``RECSYS_MAX_REJECTED_ROWS_PER_REASON`` | 1000 | rows ``raw.rejected_*`` keep per reason (all counted) |
| ``RECSYS_FILES_ENCODING`` | ``utf-8`` | ``files``: encoding of csv/tsv, ``utf-8`` \\| ``latin-1`` |
| ``RECSYS_KEEP_VERSIONS`` | 5 | registry versions ``prune_storage`` keeps per family (plus ``CURRENT``) |
| ``RECSYS_SCORE_MEMORY_MB`` | 256 | MiB per evaluation scoring call (top-K users x items, kNN histories) |
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.budget import DEFAULT_SCORE_MEMORY_MB
from ingest.layouts import MAX_LINE_BYTES, MAX_UNPACKED_BYTES, MAX_ZIP_MEMBERS
from ingest.validation import MAX_REJECTED_ROWS_PER_REASON

REPO_ROOT = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = REPO_ROOT / "transforms"

SOURCES = ("synthetic", "movielens", "files")
SPLITS = ("temporal", "leave_last_out", "stratified")
ENCODINGS = ("utf-8", "latin-1")  # csv/tsv encodings DuckDB reads without an extension
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N; resolved against torch at training time
PRECISIONS = ("auto", "fp32", "bf16")  # models.runtime.PRECISIONS (this module does not import torch)
DEFAULT_STREAM_BUFFER_ROWS = 1 << 18  # = models.runtime.DEFAULT_BUFFER_ROWS (not imported: torch)
DEFAULT_SPARSE_MIN_ROWS = 20_000  # = models.runtime.DEFAULT_SPARSE_MIN_ROWS
# The input guards' defaults (reasons beside them in ingest/guards.py):
# 1 MiB per text line, 8 GiB unpacked per compressed file, 10,000 members per MovieLens zip,
# 1,000 rejected rows kept per reason.
DEFAULT_MAX_LINE_BYTES = MAX_LINE_BYTES
DEFAULT_MAX_UNPACK_BYTES = MAX_UNPACKED_BYTES
DEFAULT_KEEP_VERSIONS = 5
DEFAULT_MAX_ZIP_MEMBERS = MAX_ZIP_MEMBERS
DEFAULT_MAX_REJECTED_ROWS_PER_REASON = MAX_REJECTED_ROWS_PER_REASON
WAREHOUSES = ("duckdb", "spark")


class SettingsError(ValueError):
    """A configuration value is unusable; the message names the variable and the fix."""


def _env_int(env: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer; set it to an integer >= {minimum}.") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below {minimum}; set it to an integer >= {minimum}.")
    return value


def _env_frac(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number; set a fraction in (0, 0.5).") from None
    if not 0.0 < value < 0.5:
        raise SettingsError(f"{name}={value} is outside (0, 0.5); set a fraction in (0, 0.5).")
    return value


def _env_choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value


# What DuckDB's memory_limit accepts that we pass on: a number and a byte unit.
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def memory_size(value: str, name: str = "RECSYS_DUCKDB_MEMORY_LIMIT") -> str:
    """``value`` if it is a memory size such as ``2GB``, ``512MB`` or ``1.5GiB``, else a
    SettingsError naming ``name``. The value reaches DuckDB and dbt's profile, so nothing else
    (quotes, SQL) may pass."""
    text = value.strip()
    if not _MEMORY_SIZE.match(text):
        raise SettingsError(
            f"{name}={value!r} is not a memory size: give a number and a unit, e.g. 2GB, 512MB or 1.5GiB."
        )
    return text


def device_choice(value: str | None, name: str = "RECSYS_DEVICE") -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (lower-cased), else a SettingsError naming ``name``.
    Whether CUDA is there is checked when a family trains (``models.runtime.resolve_device``)."""
    text = (value or "auto").strip().lower()
    if text not in DEVICES and not re.fullmatch(r"cuda:\d+", text):
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(DEVICES)} (or cuda:N, e.g. cuda:1).")
    return text


def precision_choice(value: str | None, name: str = "RECSYS_PRECISION") -> str:
    """``auto``, ``fp32`` or ``bf16`` (lower-cased), else a SettingsError naming ``name``."""
    text = (value or "auto").strip().lower()
    if text not in PRECISIONS:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(PRECISIONS)}.")
    return text


def parse_column_map(text: str | None) -> dict[str, str]:
    """``"user_id=uid, item_id=sku"`` -> ``{"user_id": "uid", "item_id": "sku"}``."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise SettingsError(
                f"RECSYS_COLUMN_MAP entry {part!r} is not 'canonical=source' "
                "(for example 'user_id=uid,item_id=sku,rating=stars,timestamp=ts')."
            )
        canonical, source = (s.strip() for s in part.split("=", 1))
        mapping[canonical] = source
    return mapping


@dataclass(frozen=True)
class Settings:
    home: Path
    source: str = "synthetic"
    data_path: Path | None = None
    column_map: dict[str, str] = field(default_factory=dict)
    split: str = "temporal"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    split_seed: int = 42
    history_len: int = 50
    synth_users: int = 943
    synth_items: int = 1682
    synth_events: int = 100_000
    synth_seed: int = 42
    min_events: int = 100
    duckdb_memory_limit: str = "2GB"
    model_config: Path | None = None
    max_concurrent: int = 1
    bless_tolerance: float = 0.02
    device: str = "auto"
    torch_threads: int = 1
    precision: str = "auto"
    stream_buffer_rows: int = DEFAULT_STREAM_BUFFER_ROWS
    sparse_min_rows: int = DEFAULT_SPARSE_MIN_ROWS
    # 1: train in the step's own process (as always); N > 1: a torchrun group of N DDP processes
    # (pipeline/torchrun.py), for the gradient-trained families only
    train_procs: int = 1
    families: tuple[str, ...] = ()  # empty = every registered family
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_unpack_bytes: int = DEFAULT_MAX_UNPACK_BYTES
    max_zip_members: int = DEFAULT_MAX_ZIP_MEMBERS
    max_rejected_per_reason: int = DEFAULT_MAX_REJECTED_ROWS_PER_REASON
    files_encoding: str = "utf-8"
    # Five recent versions to roll back to (a nightly refresh promotes at most one per family);
    # older ones, and the snapshots and artifacts only they needed, are pruned (retention.py).
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    warehouse_engine: str = "duckdb"  # RECSYS_WAREHOUSE: the engine dbt builds on
    # MiB one scoring call of evaluation may take; passed to evaluation.evaluate_onnx
    score_memory_mb: int = DEFAULT_SCORE_MEMORY_MB

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def spark_dir(self) -> Path:
        """The Spark target's metastore, warehouse folder, raw parquet and tables."""
        return self.home / "spark"

    @property
    def landing_dir(self) -> Path:
        """Files dropped here are picked up by the landing sensor."""
        return self.home / "landing"

    @property
    def scratch_dir(self) -> Path:
        """Intermediate files of one ingest (generated parts, unpacked zips)."""
        return self.home / "scratch"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def artifacts_dir(self) -> Path:
        """Per-run training, export and evaluation outputs (never overwritten)."""
        return self.home / "artifacts"

    @property
    def registry_dir(self) -> Path:
        """Blessed models only, promoted atomically: <family>/<version>/ and <family>/CURRENT."""
        return self.home / "registry"

    def dbt_vars(self, split: str | None = None) -> dict[str, object]:
        return {
            "split": split or self.split,
            "valid_frac": self.valid_frac,
            "test_frac": self.test_frac,
            "split_seed": self.split_seed,
            "history_len": self.history_len,
        }

    def dbt_env(self) -> dict[str, str]:
        """Environment the dbt subprocess needs (its profile reads these)."""
        env = {
            "RECSYS_WAREHOUSE": str(self.warehouse),
            "RECSYS_DUCKDB_MEMORY_LIMIT": self.duckdb_memory_limit,
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        if self.warehouse_engine == "spark":  # profiles.yml: the `spark` target and its folders
            spark = self.spark_dir
            env.update(RECSYS_WAREHOUSE="spark", RECSYS_SPARK_DIR=str(spark),
                       RECSYS_SPARK_RAW_DIR=str(spark / "raw"),
                       RECSYS_SPARK_TABLES_DIR=str(spark / "tables"))  # fmt: skip
        return env


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    home = Path(env.get("RECSYS_HOME") or REPO_ROOT / ".recsys_home").expanduser().resolve()
    source = _env_choice(env, "RECSYS_SOURCE", "synthetic", SOURCES)
    data_path = Path(env["RECSYS_DATA_PATH"]).expanduser() if env.get("RECSYS_DATA_PATH") else None
    if source != "synthetic" and data_path is None:
        raise SettingsError(
            f"RECSYS_SOURCE={source} needs RECSYS_DATA_PATH: the folder, zip or file to read."
        )
    valid_frac = _env_frac(env, "RECSYS_VALID_FRAC", 0.1)
    test_frac = _env_frac(env, "RECSYS_TEST_FRAC", 0.1)
    return Settings(
        home=home,
        source=source,
        data_path=data_path,
        column_map=parse_column_map(env.get("RECSYS_COLUMN_MAP")),
        split=_env_choice(env, "RECSYS_SPLIT", "temporal", SPLITS),
        valid_frac=valid_frac,
        test_frac=test_frac,
        split_seed=_env_int(env, "RECSYS_SPLIT_SEED", 42, 0),
        history_len=_env_int(env, "RECSYS_HISTORY_LEN", 50, 1),
        synth_users=_env_int(env, "RECSYS_SYNTH_USERS", 943, 1),
        synth_items=_env_int(env, "RECSYS_SYNTH_ITEMS", 1682, 2),
        synth_events=_env_int(env, "RECSYS_SYNTH_EVENTS", 100_000, 1),
        synth_seed=_env_int(env, "RECSYS_SYNTH_SEED", 42, 0),
        min_events=_env_int(env, "RECSYS_MIN_EVENTS", 100, 1),
        duckdb_memory_limit=memory_size(env.get("RECSYS_DUCKDB_MEMORY_LIMIT") or "2GB"),
        model_config=Path(env["RECSYS_MODEL_CONFIG"]).expanduser()
        if env.get("RECSYS_MODEL_CONFIG")
        else None,
        bless_tolerance=_env_frac(env, "RECSYS_BLESS_TOLERANCE", 0.02),
        max_concurrent=_env_int(env, "RECSYS_MAX_CONCURRENT", 1, 1),
        device=device_choice(env.get("RECSYS_DEVICE")),
        torch_threads=_env_int(env, "RECSYS_TORCH_THREADS", 1, 1),
        precision=precision_choice(env.get("RECSYS_PRECISION")),
        stream_buffer_rows=_env_int(env, "RECSYS_STREAM_BUFFER_ROWS", DEFAULT_STREAM_BUFFER_ROWS, 1),
        sparse_min_rows=_env_int(env, "RECSYS_SPARSE_MIN_ROWS", DEFAULT_SPARSE_MIN_ROWS, 0),
        train_procs=_env_int(env, "RECSYS_TRAIN_PROCS", 1, 1),
        families=tuple(f.strip() for f in (env.get("RECSYS_FAMILIES") or "").split(",") if f.strip()),
        max_line_bytes=_env_int(env, "RECSYS_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES, 64),
        max_unpack_bytes=_env_int(env, "RECSYS_MAX_UNPACK_BYTES", DEFAULT_MAX_UNPACK_BYTES, 1),
        max_zip_members=_env_int(env, "RECSYS_MAX_ZIP_MEMBERS", DEFAULT_MAX_ZIP_MEMBERS, 1),
        max_rejected_per_reason=_env_int(
            env, "RECSYS_MAX_REJECTED_ROWS_PER_REASON", DEFAULT_MAX_REJECTED_ROWS_PER_REASON, 1
        ),
        files_encoding=_env_choice(env, "RECSYS_FILES_ENCODING", "utf-8", ENCODINGS),
        keep_versions=_env_int(env, "RECSYS_KEEP_VERSIONS", DEFAULT_KEEP_VERSIONS, 1),
        warehouse_engine=warehouse_choice(env.get("RECSYS_WAREHOUSE")),
        score_memory_mb=_env_int(env, "RECSYS_SCORE_MEMORY_MB", DEFAULT_SCORE_MEMORY_MB, 1),
    )


def warehouse_choice(value: str | None) -> str:
    """``duckdb`` or ``spark``. An absolute path also means ``duckdb``: it is what ``dbt_env``
    exports for the dbt profile's duckdb target (the DuckDB file), so a process that exported
    it reads its own setting back unchanged."""
    text = (value or "duckdb").strip()
    if text.lower() in WAREHOUSES:
        return text.lower()
    if os.path.isabs(text):
        return "duckdb"
    raise SettingsError(f"RECSYS_WAREHOUSE={value!r} is not one of {', '.join(WAREHOUSES)}.")


def ensure_writable(folder: Path, variable: str = "RECSYS_HOME") -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any work.

    A read-only mount, a full disk, missing permissions or a file where the folder should be
    stop the run here with one clear message (naming ``variable``) instead of half-way
    through, deep inside DuckDB or torch. Nothing already in ``folder`` is touched: the probe
    is a new hidden file, removed at once.

    Raises:
        SettingsError: the folder cannot be created or written; the message says why and what to do.
    """
    import errno
    import tempfile

    from common.io import storage_error

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe.", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except FileExistsError as exc:
        raise SettingsError(
            f"{variable}={folder}: {exc.filename or folder} is a file, not a folder; "
            f"move it away or point {variable} at a folder."
        ) from None
    except OSError as exc:
        if exc.filename and ".write-probe." in str(exc.filename):
            exc.filename = None  # the probe's name would only confuse
        if exc.errno == errno.ENOTDIR:
            exc.strerror = "a file stands where a folder is needed"
        error = storage_error(exc, folder, kept="Nothing there was changed.")
        raise SettingsError(f"{variable}={folder} is not writable. {error}") from None
    return folder
