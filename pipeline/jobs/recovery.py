"""Recovery of jobs that no worker will end on its own: rescue (send a stranded job again before its deadline)
and reap (end a job still open past its deadline). Any API process may run both: ends are conditional, and a
job sent twice still ends once (the first end wins)."""

from __future__ import annotations

import time

from pipeline.jobs.keys import OPEN_KEY, TERMINAL, heartbeat_key, job_key, resent_key
from pipeline.jobs.store import AsyncJobStore, failed_event, parse_job, reaped


class Recovery:
    """Rescue and reap over one async job store; remembers, per process, since when it saw each job stranded."""

    def __init__(self, store: AsyncJobStore) -> None:
        self.store = store
        self.settings = store.settings
        self._stranded_since: dict[str, float] = {}  # job id -> when this process first saw it stranded

    async def rescue(self, now: float | None = None) -> list[str]:
        """Send again the open jobs no worker will otherwise run before their deadline: queued for
        ``rescue_after_s`` while the queue is empty (their message was lost, e.g. in flight to a worker when
        Redis stopped), or running on a worker whose heartbeat expired (it died; its message comes back only
        after the visibility timeout, past the deadline). A job sent twice still ends once (the first end
        wins), so a wrong guess costs one wasted run, never a second result."""
        now = now or time.time()
        s, r = self.settings, self.store.r
        ids = [str(i) for i in await r.zrangebyscore(OPEN_KEY, now, "+inf", start=0, num=2000)]
        if not ids or not s.rescue_max:
            return []
        queue_empty = await r.llen(s.search_queue) == 0
        jobs = [parse_job(raw) for raw in await r.mget([job_key(i) for i in ids])]
        seen: dict[str, float] = {}
        for job in jobs:
            if job is None or job.status in TERMINAL:
                continue
            # queued with nothing left in the queue: its message is held by a worker (about to start it) or lost;
            # only one still so after rescue_after_s counts
            if (job.status == "queued" and queue_empty) or (
                    job.status == "running" and job.worker and not await r.exists(heartbeat_key(job.worker))):
                seen[job.id] = self._stranded_since.get(job.id, now)
        self._stranded_since = seen
        sent = []
        for job_id in [j for j, since in seen.items() if now - since >= s.rescue_after_s]:
            del self._stranded_since[job_id]
            n = await r.incr(resent_key(job_id))
            await r.expire(resent_key(job_id), s.job_ttl_s)
            if n > s.rescue_max:
                continue
            await self.store.send(job_id)
            sent.append(job_id)
        return sent

    async def reap(self, now: float | None = None) -> list[str]:
        """End the jobs still open ``reaper_grace_s`` past their deadline: no worker will (all dead, or the
        queue lost them). Ends written only where the job is still open, so a late worker's end stands."""
        cutoff = (now or time.time()) - self.settings.reaper_grace_s
        r = self.store.r
        ids = [str(i) for i in await r.zrangebyscore(OPEN_KEY, "-inf", cutoff, start=0, num=500)]
        ended: list[str] = []
        for job_id in ids:
            job = parse_job(await r.get(job_key(job_id)))
            if job is None or job.status in TERMINAL:  # expired, or ended by a path that did not leave the set
                await r.zrem(OPEN_KEY, job_id)
                continue
            job = reaped(job)
            if await self.store.write(job, failed_event(job)):
                ended.append(job_id)
                await self.store.release(job)
        return ended
