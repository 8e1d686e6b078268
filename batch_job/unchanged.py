"""Images this model scored on an earlier night, recognised without reading them (with --ledger).

Each file of a shard is stat'ed first. A file whose path, size, mtime and ctime the ledger recorded (table
``files``), and whose bytes this model scored, gets its ``skipped`` row from the ledger alone: it is never opened.
The rest go to scoring.score_paths, which reads and hashes them and skips those whose bytes the model scored
under another path or before a touch. Every file read in this run (scored, or skipped by its bytes) leaves its
key for the ledger, with the stat taken *before* it was read: a file that changed while it was read has a newer
mtime or ctime than the one recorded, so the next night reads it again.

ctime besides path, size and mtime: a file rewritten in place with its mtime set back (an export that stamps the
study time, ``cp -p`` over a file of the same size) keeps its size and mtime but gets a new ctime, which only the
kernel sets. A rename, chmod or new hard link also changes ctime: such a file is read and hashed once more
(and skipped if its bytes are known), never wrongly skipped.
"""
from __future__ import annotations

from batch_job import ledger_lookup
from batch_job.ledger import FileKey
from batch_job.scoring import Row, ScoringSpec, file_stat, score_paths, skipped_row


def score_shard(paths: list[str], labels: list[str], spec: ScoringSpec) -> tuple[list[Row], list[FileKey]]:
    """One row per path, in order, and the file keys of the files read here. Without a ledger: score_paths."""
    if not spec.ledger_path:
        return score_paths(paths, spec, labels), []
    stats = [file_stat(p) for p in paths]
    rows: list[Row | None] = [None] * len(paths)
    todo = []
    for i, (path, label, st) in enumerate(zip(paths, labels, stats)):
        known = (ledger_lookup.lookup_unchanged(spec.ledger_path, path, st, spec.model_id, spec.allowed_modalities)
                 if st else None)
        if known:
            rows[i] = skipped_row(path, label, spec, known)
        else:
            todo.append(i)
    keys: list[FileKey] = []
    if todo:
        for i, row in zip(todo, score_paths([paths[i] for i in todo], spec, [labels[i] for i in todo])):
            rows[i] = row
            if row.status in ("ok", "skipped", "out_of_scope") and row.sha256 and stats[i]:
                keys.append((row.path, *stats[i], row.sha256))
    return rows, keys
