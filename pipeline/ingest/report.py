"""What an ingest run did, item by item counted, with its time per stage: returned by a run, logged, recorded
in the ledger and in the metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class IngestReport:
    run_id: str = ""
    source: str = ""
    resumed: bool = False
    listed: int = 0  # entries the source listed
    rejected: int = 0  # listed, but no image post (removed, a link, a video, ...)
    skipped: int = 0  # settled by an earlier run: ingested, duplicate, taken down, failed for good
    downloaded: int = 0
    duplicates: int = 0
    ingested: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # this run's failures: id -> why
    source_failures: dict[str, str] = field(default_factory=dict)  # e.g. a subreddit whose listing failed
    # seconds per stage: list, embed, write and dedup on the run's own threads; download and decode summed
    # over the download threads (they overlap the others); wall is the run's whole time
    stages: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.ingested / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3)}

    def summary(self) -> str:
        st = ", ".join(f"{k} {v:.1f}" for k, v in self.stages.items())
        return (f"run {self.run_id}{' (resumed)' if self.resumed else ''}: listed {self.listed}, rejected {self.rejected}, "
                f"skipped {self.skipped}, downloaded {self.downloaded}, duplicates {self.duplicates}, "
                f"failed {len(self.failed)}, ingested {self.ingested} in {self.wall_s:.1f} s "
                f"({self.images_per_s:.2f} images/s); seconds per stage: {st}")
