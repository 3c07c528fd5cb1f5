"""Recovery of jobs that no worker will end on its own: rescue (send a stranded job again before its deadline)
and reap (end a job still open past its deadline). Any API process may run both: ends are conditional, and a
job sent twice still ends once (the first end wins)."""

from __future__ import annotations

import time

from pipeline.jobs.commands import Overdue, Resent, Stranded
from pipeline.jobs.store import AsyncJobStore, failed_event, reaped


class Recovery:
    """Rescue and reap over one async job store; remembers, per process, since when it saw each job stranded."""

    def __init__(self, store: AsyncJobStore) -> None:
        self.store = store
        self.x = store.x
        self.settings = store.settings
        self._stranded_since: dict[str, float] = {}  # job id -> when this process first saw it stranded

    async def rescue(self, now: float | None = None) -> list[str]:
        """Send again the open jobs no worker will otherwise run before their deadline: queued for
        ``rescue_after_s`` while the queue is empty (their message was lost, e.g. in flight to a worker when
        Redis stopped), or running on a worker whose heartbeat expired (it died; its message comes back only
        after the visibility timeout, past the deadline). A job sent twice still ends once (the first end
        wins), so a wrong guess costs one wasted run, never a second result."""
        now = now or time.time()
        s = self.settings
        if not s.rescue_max:
            return []
        stranded = await self.x.run(Stranded(s.search_queue, now))
        # only a job still stranded after rescue_after_s counts (one held by a worker about to start it is not)
        self._stranded_since = {job_id: self._stranded_since.get(job_id, now) for job_id in stranded}
        sent = []
        for job_id in [j for j, since in self._stranded_since.items() if now - since >= s.rescue_after_s]:
            del self._stranded_since[job_id]
            if await self.x.run(Resent(job_id, s.job_ttl_s)) > s.rescue_max:
                continue
            await self.store.send(job_id)
            sent.append(job_id)
        return sent

    async def reap(self, now: float | None = None) -> list[str]:
        """End the jobs still open ``reaper_grace_s`` past their deadline: no worker will (all dead, or the
        queue lost them). Ends written only where the job is still open, so a late worker's end stands."""
        cutoff = (now or time.time()) - self.settings.reaper_grace_s
        ended: list[str] = []
        for job in await self.x.run(Overdue(cutoff)):
            job = reaped(job)
            if await self.store.write(job, failed_event(job)):
                ended.append(job.id)
                await self.store.release(job)
        return ended
