"""A container's cgroup on the host: where its monitor, its VM's QEMU and its exec proxies
live, placed where runc would place the container, and bounded so that a VM cannot hurt the
host while a healthy one is never killed.

- ``hierarchy.py``: the cgroup hierarchies the host mounts (v1, hybrid, v2) and the caller's own
  cgroups, from /proc/self/mountinfo and /proc/self/cgroup;
- ``paths.py``: runc's rules for where ``linux.cgroupsPath`` puts the container (cgroupfs and
  ``--systemd-cgroup``), as a :class:`~paths.Placement`;
- ``tree.py``: making that cgroup, moving processes into it, listing and removing it;
- ``systemd.py``: the transient unit systemd holds it in, where systemd runs (over busctl);
- ``limits.py``: the host-side limits of a VM's cgroup (its RAM, vCPUs and tasks, plus QEMU's
  overhead), raised when the VM grows;
- ``oom.py``: an OOM kill in the guest, told to the host cgroup where containerd looks for it;
- ``files.py``: reading and writing cgroup control files.
"""
