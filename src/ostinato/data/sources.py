"""Where training text comes from: the reasoning corpus, local files, or Python's own source."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from ostinato.config import DataConfig
from ostinato.data.reasoning import Problem, make_problems

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
VALIDATION_SHARE = 50  # one document in 50 is kept for validation loss


@dataclass
class Documents:
    train: list[str]
    validation: list[str]
    heldout: list[Problem] = field(default_factory=list)  # problems with checkable answers


def load_documents(cfg: DataConfig) -> Documents:
    if cfg.source == "reasoning":
        train, held = make_problems(cfg.seed, cfg.problems, cfg.heldout)
        return Documents([p.text for p in train], [p.text for p in held], held)
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        texts = _read_files(sorted(root.rglob("*.py")), cfg)
    else:
        texts = _read_files(_list_files(cfg.path), cfg)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(
            f"data.path = {cfg.path!r}: the corpus is empty (no non-empty text found in "
            f"{', '.join(FILE_SUFFIXES)} files). Point data.path at files with text in them."
        )
    if len(texts) == 1:
        return Documents(texts, texts)
    share = min(VALIDATION_SHARE, len(texts))
    validation = texts[share - 1 :: share]
    train = [t for i, t in enumerate(texts) if i % share != share - 1]
    return Documents(train, validation)


def _list_files(path: str) -> list[Path]:
    if not path:
        raise ValueError("data.path is empty: data.source = 'files' needs a file or directory.")
    root = Path(path)
    if not root.exists():
        raise ValueError(
            f"data.path = {path!r} does not exist. Give an existing file or directory."
        )
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)


def _read_files(paths: list[Path], cfg: DataConfig) -> list[str]:
    """Read documents in a fixed order until `max_bytes` of text is collected."""
    texts: list[str] = []
    total = 0
    for path in paths:
        for text in _read_one(path, cfg.text_field):
            texts.append(text)
            total += len(text)
            if total >= cfg.max_bytes:
                return texts
    return texts


def _read_one(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [_field(row, text_field, path) for row in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(
                f"{path}: no column {text_field!r} (data.text_field); columns: {table.column_names}"
            )
        return [str(v) for v in table.column(text_field).to_pylist() if v is not None]
    return [path.read_text(errors="replace")]


def _field(row: object, text_field: str, path: Path) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise ValueError(
            f"{path}: a row has no string field {text_field!r} (data.text_field). "
            f"Set --data.text_field to the field that holds the text."
        )
    return row[text_field]
