"""The container status state machine (runc semantics), answering its own questions."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    @property
    def can_start(self) -> bool:
        return self is Status.CREATED

    @property
    def can_kill(self) -> bool:
        # runc signals created containers too (the init waits in `runc init`).
        return self in (Status.CREATED, Status.RUNNING, Status.PAUSED)

    @property
    def can_delete(self) -> bool:
        """Plain (non-forced) delete: stopped, or created (runc kills a created init)."""
        return self in (Status.STOPPED, Status.CREATED)

    @property
    def can_pause(self) -> bool:
        return self is Status.RUNNING

    @property
    def can_resume(self) -> bool:
        return self is Status.PAUSED

    @property
    def can_exec(self) -> bool:
        return self is Status.RUNNING
