#!/bin/sh
# /init of every Bonneville guest (busybox sh, PID 1 until it execs the agent).
# The image builder (backends/image/) writes this file into the initramfs together with
#   /etc/bonneville/modules          kernel modules to insmod, in dependency order
#   /etc/bonneville/modules-disk     more of them, loaded with bonneville.root=disk only
#   /etc/bonneville/python-modules   every Python module the agent needs (selftest imports them)
# Rule: whatever fails, the VM powers off; it never hangs waiting for someone.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/ LC_ALL=C.UTF-8

die() {
	echo "bonneville-init: $*; powering off" >/dev/console
	poweroff -f
	# poweroff -f only returns if the reboot syscall failed: exiting PID 1 panics the kernel,
	# and panic=-1 plus QEMU's -no-reboot end the VM.
	exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc || die "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || die "cannot mount /run"

read -r cmdline </proc/cmdline
modules=/etc/bonneville/modules
case " $cmdline " in
*" bonneville.root=disk "*) modules="$modules /etc/bonneville/modules-disk" ;;
esac
# shellcheck disable=SC2086
cat $modules | while read -r ko; do
	insmod "$ko" || echo "bonneville-init: insmod $ko failed" >/dev/console
done

case " $cmdline " in
*" bonneville.selftest=1 "*) ;;
*)
	exec /usr/bin/python3 -S -B -c '
import os, sys
sys.path.insert(0, "/opt/bonneville")
rc = 1
try:
    from bonneville.guest.agent import main
    rc = main([])
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else 1
except BaseException:
    import traceback
    traceback.print_exc()
if rc:
    print(f"bonneville-init: agent exited with status {rc}; powering off", file=sys.stderr, flush=True)
os.execv("/bin/busybox", ["poweroff", "-f"])
'
	die "cannot run /usr/bin/python3"
	;;
esac

# Self-test (kernel argument bonneville.selftest=1): check what the agent relies on, print one
# line per check, power off. integration/test_image_boot.py asserts these lines.
release=$(uname -r)
failed=0
port=""
tries=0
# The port's name arrives from the host after the driver probed: poll it (bounded, ~5 s).
while [ -z "$port" ] && [ "$tries" -lt 500 ]; do
	for f in /sys/class/virtio-ports/*/name; do
		[ -r "$f" ] || continue
		read -r name <"$f" || continue
		if [ "$name" = bonneville.agent ]; then
			port=${f%/name}
			port=/dev/${port##*/}
		fi
	done
	[ -n "$port" ] || usleep 10000
	tries=$((tries + 1))
done
if [ -n "$port" ] && [ -c "$port" ]; then
	echo "BONNEVILLE SELFTEST PORT OK bonneville.agent $port"
else
	echo "BONNEVILLE SELFTEST FAIL no virtio-serial port named bonneville.agent"
	failed=1
fi

mkdir -p /mnt
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 bonneville-root /mnt; then
	echo "BONNEVILLE SELFTEST 9P OK bonneville-root"
	if [ -r /mnt/selftest-in ]; then
		read -r line </mnt/selftest-in
		echo "BONNEVILLE SELFTEST 9P READ $line"
	fi
	echo "$release" >/mnt/selftest-out 2>/dev/null
	umount /mnt
else
	echo "BONNEVILLE SELFTEST FAIL cannot mount 9p tag bonneville-root"
	failed=1
fi

BONNEVILLE_SELFTEST_FAILED=$failed /usr/bin/python3 -S -B -c '
import os, sys
sys.path.insert(0, "/opt/bonneville")
try:
    import bonneville.guest.protocol
    with open("/etc/bonneville/python-modules") as f:
        names = f.read().split()
    for name in names:
        __import__(name)
    import ctypes
    if ctypes.CDLL(None).getpid() != os.getpid():
        raise RuntimeError("ctypes getpid mismatch")
except BaseException as exc:
    print("BONNEVILLE SELFTEST FAIL python:", repr(exc), flush=True)
    sys.exit(1)
print("BONNEVILLE SELFTEST PYTHON OK", len(names), "modules", flush=True)
with open("/proc/uptime") as f:
    print("BONNEVILLE SELFTEST UPTIME", f.read().split()[0], flush=True)
if os.environ.get("BONNEVILLE_SELFTEST_FAILED") == "0":
    print("BONNEVILLE SELFTEST OK", os.uname().release, flush=True)
' || echo "BONNEVILLE SELFTEST FAIL python exited with status $?"
poweroff -f
exit 1
