"""Which earlier nights' worklists hold the images tonight skips through the ledger, flagged or not screened there
(QA, 2026-12-02: a night's 110 flagged scans were only "184 skipped" the night after, and no page said where to read
them). The workers count them by the run that scored the bytes (shard_result.earlier_counts); here the driver finds
those runs in the ledger's `runs` table and words what report.md and report.html say."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from batch_job.ledger_identity import table_rows
from batch_job.ledger_lookup import read_only

SHOWN = 3  # nights named one by one, the latest first; older ones are summed


@dataclass(frozen=True)
class EarlierNight:
    """An earlier night whose worklist holds images tonight skips: where it published, when it finished (UTC), how many
    of tonight's skipped images are flagged at tonight's threshold or were not screened, and for the nights named
    (SHOWN), the threshold its worklist flagged at (its metrics.json; None where unread) and whether its folder is
    gone."""

    out_dir: str  # "" where the ledger no longer knows the run
    finished_utc: str
    flagged: int
    unscreened: int
    threshold: float | None = None
    gone: bool = False

    def line(self, tonight: float) -> str:
        """`OUT_DIR (finished 2026-12-01 02:14 UTC): N flagged, M not screened`, and what differs there."""
        where = self.out_dir or "a run the ledger no longer lists"
        when = f" (finished {self.finished_utc[:16].replace('T', ' ')} UTC)" if self.finished_utc else ""
        notes = ["its folder is no longer there"] * self.gone
        if self.threshold is not None and abs(self.threshold - tonight) > 5e-5:  # review: counted at tonight's
            notes.append(f"its worklist flagged at {self.threshold:.4f}, not {tonight:.4f}")
        return f"{where}{when}: {self.flagged} flagged, {self.unscreened} not screened" + "".join(
            f" ({note})" for note in notes)


def threshold_of(out_dir: str) -> float | None:
    """The threshold a published night flagged at (its metrics.json), or None where it cannot be read."""
    try:
        with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
            value = json.load(f).get("threshold")
        return float(value) if isinstance(value, (int, float)) else None
    except (OSError, ValueError, AttributeError):
        return None


def nights_of(path: str, counts: dict[str, tuple[int, int]]) -> list[EarlierNight]:
    """The earlier nights of `counts` (run id -> flagged, not screened), the latest first (commit order)."""
    if not counts or not os.path.exists(path):
        return []
    runs = list(counts)
    known: dict[str, tuple[int, str, str]] = {}
    with contextlib.closing(read_only(path)) as conn:
        for start in range(0, len(runs), 500):  # SQLite's bound on the number of parameters
            chunk = runs[start:start + 500]
            rows = table_rows(conn, f"SELECT run_id, rowid, out_dir, finished_utc FROM runs WHERE run_id IN "
                               f"({', '.join('?' * len(chunk))})", *chunk)
            known.update({run: (order, out, finished) for run, order, out, finished in rows})
    # the commit order (a commit replaces its run's row: a new rowid); finished_utc is to the second only
    latest_first = sorted(runs, key=lambda run: known.get(run, (-1,))[0], reverse=True)
    nights = []
    for i, run in enumerate(latest_first):
        _, out, finished = known.get(run, (-1, "", ""))
        named = i < SHOWN and bool(out)  # only the nights the note names are looked at on disk
        nights.append(EarlierNight(out, finished, *counts[run], threshold_of(out) if named else None,
                                   named and not os.path.isdir(out)))
    return nights


def lines(nights: tuple[EarlierNight, ...], tonight: float) -> list[str]:
    """One line a night named, the latest first, and one for the older ones together."""
    shown = [n.line(tonight) for n in nights[:SHOWN]]
    rest = nights[SHOWN:]
    if rest:
        shown.append(f"{len(rest)} older nights: {sum(n.flagged for n in rest)} flagged, "
                     f"{sum(n.unscreened for n in rest)} not screened")
    return shown
