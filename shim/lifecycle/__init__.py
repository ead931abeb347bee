"""The container lifecycle behind the CLI commands (runc semantics, one VM per container or
pod): each module in shim/commands/ parses its arguments and calls one of these.

- ``context.py``: ``Context`` (the --root store, the global flags), the live
  status (``refresh``) and ``locked``, the lock-load-refresh every command on one container
  starts with; the runtime-spec state object; requests to the monitor's control socket;
- ``creation.py``: ``create`` (checks, pod placement, host cgroup, the monitor's hand-over,
  hooks; undone if it fails);
- ``running.py``: ``start``, ``run``, ``kill``, ``pause``/``resume``, ``exec``, ``update``;
- ``query.py``: the read-only commands: ``state``, ``list``, ``ps``, ``events``' ``stats``;
- ``teardown.py``: ``delete``, and ending a monitor and its VM;
- ``hostcgroup.py``: the container's host cgroup as the commands size, enter and update it.
"""
