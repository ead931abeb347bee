"""The vSphere backend: each container a VM on vCenter/ESXi, driven with pyVmomi.

launch(): boot ISO on the datastore (once per guest image) → template VM (once per ISO; a
snapshot for linked clones, powered on for instant clones) → the container's VM by
InstantClone_Task where the server has it, else a linked clone of the template snapshot, else a
full clone → its root disk (ext4 of the share, uploaded into the VM's folder) and serial ports
added, CPU/memory set → power on → the guest's agent connects to our TCP listener
(transport.py). Everything made for the container is undone, newest first, if any step fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from bonneville.backends.base import VM, Backend, Capability, VMConfig, write_journal
from bonneville.backends.vsphere import media, specs
from bonneville.backends.vsphere.config import VSphereSettings, load
from bonneville.backends.vsphere.datastore import Datastore, ds_path
from bonneville.backends.vsphere.transport import SerialListener, new_token
from bonneville.backends.vsphere.vmomi import vmomi
from bonneville.spec.errors import BackendError

log = logging.getLogger("bonneville.vsphere")

ISO_DIR = "bonneville"
INSTANT = "instant clone"
INSTANT_CLONE_API = (6, 7)
WATCH_INTERVAL = 2.0  # how often the monitor's watcher asks whether the VM still runs
TEMPLATE_LOCK = "/run/bonneville-vsphere-template.lock"
TASK_TIMEOUT = 600.0  # a hang guard: uploads and clones of big disks take minutes


# ---- the runtime's network namespace -------------------------------------------------------------

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise BackendError(f"cannot enter the runtime's network namespace: {os.strerror(err)}")


def in_netns(fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` run in the network namespace ``fd`` (-1: here), in a thread of its own.

    The monitor sits in the container's network namespace, where neither vCenter nor ESXi is
    reachable; setns(2) of a network namespace is per thread, and sockets keep the namespace
    they were made in, so the connections and the serial listener made there work from any
    thread afterwards."""
    if fd < 0:
        return fn()
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _setns(fd)
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="vsphere-netns")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


# ---- connection ------------------------------------------------------------------------------


def _fault_text(exc: object) -> str:
    msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return " ".join(str(msg).split())


def wait_task(task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
    """A task's result; its fault becomes a BackendError naming ``what`` (cause kept).

    Waits on a property collector filter of the task's state (no polling), reading only
    info.state/error/result: vcsim reports a FileManager as some tasks' `entity`, which
    pyVmomi refuses to deserialise as a ManagedEntity, so the whole `info` is never fetched.
    """
    vim, vmodl = vmomi().vim, vmomi().vmodl
    pc = vim.ServiceInstance("ServiceInstance", task._stub).content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task, skip=False)],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(
                type=vim.Task, pathSet=["info.state", "info.error", "info.result"], all=False
            )
        ],
    )
    deadline = time.monotonic() + timeout
    values: dict[str, Any] = {}
    pc_filter = pc.CreateFilter(spec, partialUpdates=False)
    try:
        version = ""
        while str(values.get("info.state")) not in ("success", "error"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"{what}: no answer from vSphere within {timeout:.0f} s")
            options = vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=max(1, min(int(remaining), 60))
            )
            update = pc.WaitForUpdatesEx(version, options)
            if update is None:
                continue
            version = update.version
            for filter_set in update.filterSet or []:
                for obj in filter_set.objectSet or []:
                    for change in obj.changeSet or []:
                        values[change.name] = change.val
    except vmodl.MethodFault as exc:
        raise BackendError(f"{what}: {_fault_text(exc)}") from exc
    finally:
        with contextlib.suppress(Exception):
            pc_filter.Destroy()
    if str(values.get("info.state")) == "error":
        fault = values.get("info.error")
        raise BackendError(f"{what}: {_fault_text(fault)}") from fault
    return values.get("info.result")


def ssl_context(cfg: VSphereSettings) -> ssl.SSLContext | None:
    if cfg.scheme != "https":
        return None
    if not cfg.verify_tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cfg.ca_file or None)


def connect(cfg: VSphereSettings) -> Any:
    """A logged-in ServiceInstance; errors say what is wrong without the password."""
    SmartConnect = vmomi("pyVim.connect").SmartConnect
    vim = vmomi().vim

    try:
        return SmartConnect(
            host=cfg.host,
            port=cfg.port,
            user=cfg.username,
            pwd=cfg.password,
            protocol=cfg.scheme,
            path=cfg.path,
            sslContext=ssl_context(cfg),
            connectionPoolTimeout=60,
        )
    except vim.fault.InvalidLogin as exc:
        raise BackendError(
            f"vSphere login to {cfg.url} as {cfg.username} failed: incorrect user name or password"
        ) from exc
    except ssl.SSLError as exc:
        raise BackendError(
            f"TLS verification of {cfg.url} failed ({exc.reason}): set vsphere.ca_file to its CA"
        ) from exc
    except OSError as exc:
        raise BackendError(f"cannot reach vSphere at {cfg.url}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise BackendError(f"cannot log in to vSphere at {cfg.url}: {_fault_text(exc)}") from exc


def disconnect(si: Any) -> None:
    Disconnect = vmomi("pyVim.connect").Disconnect

    with contextlib.suppress(Exception):
        Disconnect(si)


@contextlib.contextmanager
def session(cfg: VSphereSettings) -> Iterator[Any]:
    si = connect(cfg)
    try:
        yield si
    finally:
        disconnect(si)


# ---- inventory -------------------------------------------------------------------------------


@dataclass
class Inventory:
    datacenter: Any
    datastore: Datastore
    pool: Any
    folder: Any
    network: specs.NetworkRef | None


def _children(si: Any, root: Any, kind: Any) -> list[Any]:
    view = si.content.viewManager.CreateContainerView(root, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def _pick(items: list[Any], name: str, what: str, where: str) -> Any:
    if name:
        for item in items:
            if item.name == name:
                return item
        known = ", ".join(sorted(i.name for i in items)) or "none"
        raise BackendError(f"{what} {name!r} not found in {where} (there: {known})")
    if len(items) == 1:
        return items[0]
    known = ", ".join(sorted(i.name for i in items)) or "none"
    raise BackendError(f"set vsphere.{what.replace(' ', '_')}: {where} has {known}")


def resolve(si: Any, cfg: VSphereSettings) -> Inventory:
    """The configured datacenter, datastore, resource pool, folder and port group."""
    vim = vmomi().vim

    content = si.content
    dc = _pick(
        _children(si, content.rootFolder, vim.Datacenter),
        cfg.datacenter,
        "datacenter",
        "the inventory",
    )
    where = f"datacenter {dc.name}"
    ds = _pick(list(dc.datastore), cfg.datastore, "datastore", where)
    if cfg.resource_pool:
        pool = content.searchIndex.FindByInventoryPath(f"{dc.name}/host/{cfg.resource_pool}")
        if not isinstance(pool, vim.ResourcePool):
            raise BackendError(f"resource pool {cfg.resource_pool!r} not found in {where}")
    else:
        compute = _pick(
            _children(si, dc.hostFolder, vim.ComputeResource), cfg.cluster, "cluster", where
        )
        pool = compute.resourcePool
    folder = dc.vmFolder
    if cfg.folder:
        folder = content.searchIndex.FindByInventoryPath(f"{dc.name}/vm/{cfg.folder}")
        if not isinstance(folder, vim.Folder):
            raise BackendError(f"VM folder {cfg.folder!r} not found in {where}")
    network = None
    if cfg.network:
        net = _pick(list(dc.network), cfg.network, "network", where)
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            network = specs.NetworkRef(net.name, net.config.distributedVirtualSwitch.uuid, net.key)
        else:
            network = specs.NetworkRef(net.name)
    return Inventory(dc, Datastore(si, dc, ds, cfg.url, ssl_context(cfg)), pool, folder, network)


def find_vm(si: Any, moref: str) -> Any:
    """The VM with managed object id ``moref``, or None if it is gone."""
    vim, vmodl = vmomi().vim, vmomi().vmodl

    vm = vim.VirtualMachine(moref, si._stub)
    try:
        _ = vm.name
    except vmodl.fault.ManagedObjectNotFound:
        return None
    return vm


def api_version(si: Any) -> tuple[int, ...]:
    text = str(si.content.about.apiVersion or "0")
    try:
        return tuple(int(p) for p in text.split(".")[:2])
    except ValueError:
        return (0,)


def destroy_vm(vm: Any) -> None:
    """Power off (if on) and destroy with its disks; a VM already gone is fine."""
    vmodl = vmomi().vmodl

    try:
        if str(vm.runtime.powerState) != "poweredOff":
            with contextlib.suppress(BackendError):
                wait_task(vm.PowerOffVM_Task(), f"powering off {vm.name}")
        wait_task(vm.Destroy_Task(), f"destroying {vm.name}")
    except vmodl.fault.ManagedObjectNotFound:
        return
    except BackendError as exc:
        if isinstance(exc.__cause__, vmodl.fault.ManagedObjectNotFound):
            return
        raise


# ---- boot media and template -----------------------------------------------------------------


def ensure_iso(inv: Inventory, iso: media.BootISO) -> str:
    """The boot ISO's datastore path, uploaded if absent or of another size (a broken upload)."""
    name = iso.datastore_name
    size = inv.datastore.exists(name)
    if size != os.path.getsize(iso.path):
        inv.datastore.mkdir(ISO_DIR)
        log.info("uploading boot ISO %s to %s", iso.path, ds_path(inv.datastore.name, name))
        inv.datastore.upload(iso.path, name)
    return ds_path(inv.datastore.name, name)


def _find_template(si: Any, inv: Inventory, name: str) -> Any:
    vim = vmomi().vim

    for vm in _children(si, inv.datacenter.vmFolder, vim.VirtualMachine):
        if vm.name == name:
            return vm
    return None


def _snapshot(vm: Any) -> Any:
    tree = vm.snapshot.rootSnapshotList if vm.snapshot else []
    for node in tree or []:
        if node.name == specs.SNAPSHOT_NAME:
            return node.snapshot
    return None


def ensure_template(
    si: Any,
    inv: Inventory,
    cfg: VSphereSettings,
    iso: media.BootISO,
    iso_path: str,
    image_key: str,
    powered_on: bool,
) -> Any:
    """The template VM of this ISO (made now if missing), with its base snapshot."""
    import fcntl

    name = f"{cfg.template_prefix}-{iso.key}"
    fd = os.open(TEMPLATE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # One creator per runtime host; two hosts sharing a vCenter may still race (docs).
        fcntl.flock(fd, fcntl.LOCK_EX)
        vm = _find_template(si, inv, name)
        if vm is None:
            log.info("creating template VM %s", name)
            plan = specs.TemplatePlan(
                name, inv.datastore.name, iso_path, image_key, network=inv.network
            )
            vm = wait_task(
                inv.folder.CreateVM_Task(config=specs.template_config(plan), pool=inv.pool),
                f"creating template VM {name}",
            )
            try:
                wait_task(
                    vm.CreateSnapshot_Task(
                        name=specs.SNAPSHOT_NAME,
                        description="linked clones start here",
                        memory=False,
                        quiesce=False,
                    ),
                    f"snapshotting template {name}",
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    destroy_vm(vm)
                raise
        if powered_on and str(vm.runtime.powerState) != "poweredOn":
            wait_task(vm.PowerOnVM_Task(), f"powering on template {name}")
        return vm
    finally:
        os.close(fd)


# ---- the container's VM ----------------------------------------------------------------------


def _advertise_host(cfg: VSphereSettings) -> str:
    """The address ESXi reaches us at: configured, else the one we reach vSphere from."""
    if cfg.advertise_host:
        return cfg.advertise_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((cfg.host, cfg.port))
            address: str = probe.getsockname()[0]
            return address
        except OSError as exc:
            raise BackendError(
                f"set vsphere.advertise_host: cannot tell our address ({exc})"
            ) from exc


def vm_name(container_id: str, token: str) -> str:
    # vSphere names are up to 80 characters; the token part keeps runtimes sharing a vCenter
    # (or a reused container id) from colliding.
    return f"bnv-{container_id[:60]}-{token[:8]}"


class Undo:
    """Cleanup steps, run newest first when a launch fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except Exception as exc:
                log.error("cleanup failed (%s): %s", what, exc)


class VSphereVM(VM):
    def __init__(
        self,
        cfg: VSphereSettings,
        si: Any,
        vm: Any,
        inv: Inventory,
        folder_path: str,
        channel: socket.socket,
        listener: SerialListener,
        clone_path: str,
        netns_fd: int = -1,
    ) -> None:
        self._cfg = cfg
        self._si = si
        self._vm = vm
        self._inv = inv
        self._moref: str = vm._moId
        self._name: str = vm.name
        self._folder_path = folder_path
        self._channel = channel
        self._listener = listener
        self.clone_path = clone_path
        self._netns_fd = netns_fd
        self._ended = threading.Event()
        self._stop_watch = threading.Event()
        self._exit_r, self._exit_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, name="vsphere-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Tell the monitor when the VM stops running (powered off or deleted behind us)."""
        try:
            if self._netns_fd >= 0:
                _setns(self._netns_fd)
            with session(self._cfg) as si:
                while not self._stop_watch.wait(WATCH_INTERVAL):
                    vm = find_vm(si, self._moref)
                    if vm is None or str(vm.runtime.powerState) != "poweredOn":
                        break
        except Exception as exc:
            log.error("watching VM %s: %s", self._name, exc)
            if self._stop_watch.is_set():
                return
        if not self._stop_watch.is_set():
            self._ended.set()
            with contextlib.suppress(OSError):
                os.write(self._exit_w, b"x")

    @property
    def channel(self) -> socket.socket:
        return self._channel

    @property
    def pid(self) -> int:
        return 0

    def exit_fd(self) -> int:
        return self._exit_r

    def poll(self) -> bool:
        return self._ended.is_set()

    def private_state(self) -> dict[str, Any]:
        return {
            "vm": self._moref,
            "name": self._name,
            "datacenter": self._inv.datacenter.name,
            "datastore": self._inv.datastore.name,
            "folder": self._folder_path,
            "clone": self.clone_path,
        }

    def _destroy(self) -> None:
        destroy_vm(self._vm)
        self._inv.datastore.delete(self._folder_path)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_watch.set()
        with contextlib.suppress(OSError):
            self._channel.close()
        self._listener.close()
        try:
            in_netns(self._netns_fd, self._destroy)
        finally:
            disconnect(self._si)
            for fd in (self._exit_r, self._exit_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class VSphereBackend(Backend):
    name = "vsphere"
    capabilities = frozenset({Capability.CONSOLE})

    def __init__(self, settings: VSphereSettings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> VSphereSettings:
        if self._settings is None:
            self._settings = load()
        return self._settings

    def launch(self, config: VMConfig) -> VM:
        netns_fd = int(config.extra.get("runtime_netns_fd", -1))
        return in_netns(netns_fd, lambda: self._launch(config, netns_fd))

    def _launch(self, config: VMConfig, netns_fd: int) -> VM:
        cfg = self.settings
        from bonneville.backends.image.kernel import find_kernel

        image_dir = os.path.dirname(config.kernel)
        image_key = os.path.basename(image_dir)
        iso = media.ensure_boot_iso(
            image_key, image_dir, find_kernel().path, config.initrd, config.kernel_args
        )
        token = new_token()
        name = vm_name(config.container_id, token)
        advertise = _advertise_host(cfg)
        undo = Undo()
        si = connect(cfg)
        undo.push("log out", lambda: disconnect(si))
        try:
            inv = resolve(si, cfg)
            iso_path = ensure_iso(inv, iso)
            # The VM's one container's tree (the export holds a directory per container).
            tree = os.path.join(config.share_dir, config.container_id)
            disk = media.make_root_disk(tree, config.run_dir, token)
            for path in (disk.descriptor, disk.flat):
                undo.push(f"remove {path}", lambda p=path: _unlink(p))  # type: ignore[misc]
            listener = SerialListener(cfg.listen_host)
            undo.push("close the listener", listener.close)
            allow_instant = True
            while True:
                # One undo list per attempt: a failed instant clone is removed before the
                # linked clone is tried; anything else failing unwinds everything.
                attempt = Undo()
                undo.push("remove the VM", attempt.run)
                vm, path = self._make_vm(
                    si, inv, cfg, iso, iso_path, image_key, name, token, attempt, allow_instant
                )
                try:
                    folder = _vm_folder(vm)
                    # What destroy() needs, should this process die before create records it.
                    write_journal(
                        config.run_dir,
                        {
                            "vm": vm._moId,
                            "name": name,
                            "datacenter": inv.datacenter.name,
                            "datastore": inv.datastore.name,
                            "folder": folder[1],
                        },
                    )
                    plan = self._configure(
                        vm,
                        folder,
                        inv,
                        disk,
                        listener.uri(advertise),
                        config,
                        token,
                        image_key,
                        attempt,
                    )
                    folder_rel = folder[1]
                    break
                except BackendError as exc:
                    if path != INSTANT or cfg.clone_mode != "auto":
                        raise
                    log.warning("configuring the instant clone failed (%s): falling back", exc)
                    attempt.run()
                    allow_instant = False
            for local in (disk.flat, disk.descriptor):
                _unlink(local)
            if str(vm.runtime.powerState) != "poweredOn":
                wait_task(vm.PowerOnVM_Task(), f"powering on VM {name}")
            log.info("VM %s powered on; waiting for its agent on %s", name, plan.channel_uri)
            channel = listener.accept(token, cfg.agent_timeout)
        except BaseException:
            undo.run()
            raise
        return VSphereVM(cfg, si, vm, inv, folder_rel, channel, listener, path, netns_fd)

    def _configure(
        self,
        vm: Any,
        folder: tuple[str, str],
        inv: Inventory,
        disk: media.RootDisk,
        channel_uri: str,
        config: VMConfig,
        token: str,
        image_key: str,
        undo: Undo,
    ) -> specs.ContainerPlan:
        """Upload the root disk into the VM's ``folder`` (``_vm_folder``) and add it, the serial
        ports, the size."""
        name = vm.name
        folder_path, folder_rel = folder
        undo.push(f"delete {folder_path}", lambda: inv.datastore.delete(folder_rel))
        for local in (disk.flat, disk.descriptor):
            inv.datastore.upload(local, f"{folder_rel}/{os.path.basename(local)}")
        plan = specs.ContainerPlan(
            container_id=config.container_id,
            vm_folder_path=folder_path,
            disk_path=f"{folder_path}/{os.path.basename(disk.descriptor)}",
            channel_uri=channel_uri,
            token=token,
            memory_mib=config.memory_mib,
            vcpus=config.vcpus,
            image_key=image_key,
        )
        wait_task(
            vm.ReconfigVM_Task(spec=specs.container_config(plan, _scsi_key(vm))),
            f"configuring VM {name}",
        )
        return plan

    def _make_vm(
        self,
        si: Any,
        inv: Inventory,
        cfg: VSphereSettings,
        iso: media.BootISO,
        iso_path: str,
        image_key: str,
        name: str,
        token: str,
        undo: Undo,
        allow_instant: bool = True,
    ) -> tuple[Any, str]:
        """The container's VM by the best path the server offers; (vm, path taken)."""
        vmodl = vmomi().vmodl

        mode = cfg.clone_mode
        instant_ok = api_version(si) >= INSTANT_CLONE_API
        if mode == "instant" and not instant_ok:
            raise BackendError(
                f"vsphere.clone_mode=instant needs vSphere API {INSTANT_CLONE_API[0]}."
                f"{INSTANT_CLONE_API[1]}+, the server speaks {si.content.about.apiVersion}"
            )
        want_instant = mode == "instant" or (mode == "auto" and instant_ok and allow_instant)
        template = ensure_template(si, inv, cfg, iso, iso_path, image_key, powered_on=want_instant)
        attempts: list[tuple[str, Callable[[], Any]]] = []
        if want_instant:
            attempts.append(
                (
                    INSTANT,
                    lambda: template.InstantClone_Task(
                        spec=specs.instant_clone_spec(
                            name, inv.pool, inv.datastore.ds, inv.folder, token
                        )
                    ),
                )
            )
        elif mode == "auto":
            log.info(
                "vSphere API %s has no InstantClone (needs %d.%d): skipping it",
                si.content.about.apiVersion,
                *INSTANT_CLONE_API,
            )
        if mode in ("auto", "linked"):
            snapshot = _snapshot(template)
            if snapshot is not None:
                attempts.append(
                    (
                        "linked clone",
                        lambda: template.CloneVM_Task(
                            folder=inv.folder,
                            name=name,
                            spec=specs.linked_clone_spec(snapshot, inv.pool, inv.datastore.ds),
                        ),
                    )
                )
        if mode in ("auto", "full"):
            attempts.append(
                (
                    "full clone",
                    lambda: template.CloneVM_Task(
                        folder=inv.folder,
                        name=name,
                        spec=specs.full_clone_spec(inv.pool, inv.datastore.ds),
                    ),
                )
            )
        errors = []
        for path, start in attempts:
            try:
                vm = wait_task(start(), f"{path} of {template.name} as {name}")
            except (BackendError, vmodl.MethodFault) as exc:
                if isinstance(exc, BackendError) and _is_setup_fault(exc):
                    raise
                log.warning("%s failed (%s); trying the next way", path, exc)
                errors.append(f"{path}: {exc}")
                continue
            undo.push(f"destroy VM {name}", lambda v=vm: destroy_vm(v))  # type: ignore[misc]
            log.info("VM %s made by %s of %s", name, path, template.name)
            return vm, path
        raise BackendError(f"cannot make VM {name}: " + "; ".join(errors))

    def alive(self, private: dict[str, Any]) -> bool:
        moref = str(private.get("vm") or "")
        if not moref:
            return False
        try:
            with session(self.settings) as si:
                vm = find_vm(si, moref)
                return vm is not None and str(vm.runtime.powerState) == "poweredOn"
        except BackendError:
            # vSphere unreachable: the monitor (alive, or we would not be asked) watches the
            # VM itself and ends when it does; do not call a running container stopped.
            return True

    def destroy(self, private: dict[str, Any]) -> None:
        moref = str(private.get("vm") or "")
        if not moref:
            return
        with session(self.settings) as si:
            vm = find_vm(si, moref)
            if vm is not None and vm.name == private.get("name"):
                destroy_vm(vm)
            folder = str(private.get("folder") or "")
            if folder:
                inv = resolve(si, self.settings)
                if inv.datastore.name == private.get("datastore"):
                    inv.datastore.delete(folder)


def _vm_folder(vm: Any) -> tuple[str, str]:
    """The VM's own datastore folder: ("[ds] dir", "dir")."""
    folder_path = os.path.dirname(str(vm.config.files.vmPathName)).rstrip("/")
    folder_rel = folder_path.split("] ", 1)[1] if "] " in folder_path else ""
    if not folder_rel:
        raise BackendError(f"VM {vm.name} has no folder of its own: {folder_path}")
    return folder_path, folder_rel


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _scsi_key(vm: Any) -> int:
    vim = vmomi().vim

    for device in vm.config.hardware.device:
        if isinstance(device, vim.vm.device.VirtualSCSIController) and device.busNumber == 0:
            key: int = device.key
            return key
    raise BackendError(f"VM {vm.name} has no SCSI controller for its root disk")


def _is_setup_fault(exc: BackendError) -> bool:
    """Faults no other clone path would fix (no room, no permission): report them as they are."""
    vim = vmomi().vim

    return isinstance(exc.__cause__, vim.fault.NoPermission | vim.fault.InsufficientResourcesFault)
