"""The exception tree every layer raises; the CLI turns these into one line and exit 1."""

from __future__ import annotations


class BonnevilleError(Exception):
    """Root of every error Bonneville reports to its caller."""


class ConfigError(BonnevilleError):
    """config.json (or another input file) is missing, malformed or invalid."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ContainerNotFound(BonnevilleError):
    """No container with that id exists (runc's wording, matched by containerd)."""

    def __init__(self, container_id: str) -> None:
        super().__init__(f"container {container_id} does not exist")
        self.container_id = container_id


class ContainerExists(BonnevilleError):
    def __init__(self, container_id: str) -> None:
        super().__init__(f"container with id exists: {container_id}")
        self.container_id = container_id


class InvalidState(BonnevilleError):
    """The container's status does not allow the operation."""

    def __init__(self, message: str, status: str = "", wanted: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.wanted = wanted


class BackendError(BonnevilleError):
    """A VM backend failed (could not launch, lost the VM, refused a request)."""


class AgentError(BonnevilleError):
    """The guest agent refused a request or broke the protocol."""


class HookError(BonnevilleError):
    """A lifecycle hook failed or timed out."""
