#!/bin/sh
# /init of the `cargo xtask vm-test` guest (PID 1, busybox sh).
#
# Mounts what the tracer and the tests need, runs the kernel test binary once
# per backend named in /etc/vm-test.conf, prints one `VM-VERDICT` line per
# backend and the output of `port-trace doctor -v`, then powers off. The host
# (xtask/src/vm.rs) reads the serial console and parses the `VM-` lines.
#
# It never hangs: a background watchdog powers off after $WATCHDOG seconds,
# and if this script ever exits the kernel panics, which with `panic=-1` and
# QEMU's `-no-reboot` ends the VM too.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
# No tmpfs on /tmp: the initramfs (itself in RAM) may hold the workload at
# its build path, which can lie under /tmp (CI clones anywhere).
mkdir -p /tmp && chmod 1777 /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup

# BACKENDS, WATCHDOG, TEST_ARGS (written by xtask).
. /etc/vm-test.conf

power_off() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 5
    poweroff -f
}

(
    sleep "$WATCHDOG"
    printf "\nVM-WATCHDOG: still running after %ss; powering off\n" "$WATCHDOG"
    power_off
) &

uptime_s() {
    read -r up _ </proc/uptime
    echo "$up"
}

ip link set lo up
# sock_diag for `ss` (the tests' view of the kernel's sockets).
for module in /lib/modules/vm/inet_diag.ko /lib/modules/vm/tcp_diag.ko /lib/modules/vm/udp_diag.ko; do
    insmod "$module" || echo "VM-INFO insmod $module failed"
done

echo "VM-INFO kernel=$(uname -r) cpus=$(nproc) uptime=$(uptime_s)s"
echo "VM-INFO btf=$([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo no)" \
    "kprobe_pmu=$([ -e /sys/bus/event_source/devices/kprobe ] && echo yes || echo no)" \
    "lsm=$(cat /sys/kernel/security/lsm 2>/dev/null || echo unknown)"

export PORT_TRACE_BIN=/bin/port-trace CI=true RUST_BACKTRACE=1

for backend in $BACKENDS; do
    echo "VM-BEGIN backend=$backend"
    start=$(uptime_s)
    {
        eval "PORT_TRACE_EXTRA_ARGS='--backend $backend' /bin/port-trace-kernel-tests --test-threads=1 $TEST_ARGS"
        krc=$?
        # The lifecycle tests of the portable backend (socket walks for
        # TIME_WAIT ends, snapshot, repair after loss). Their time bounds are
        # the portable backend's; the other backends run the kernel tests.
        prc=0
        if [ "$backend" = portable ]; then
            eval "PORT_TRACE_EXTRA_ARGS='--backend $backend' /bin/port-trace-portable-tests --test-threads=1 $TEST_ARGS"
            prc=$?
        fi
        if [ "$krc" = 0 ]; then echo "$prc" >/tmp/rc; else echo "$krc" >/tmp/rc; fi
    } 2>&1 | tee "/tmp/tests-$backend.log"
    end=$(uptime_s)
    rc=$(cat /tmp/rc)
    # libtest: "test result: ok. 3 passed; 0 failed; 0 ignored; ..."
    # Summed over the test binaries.
    counts=$(awk '/^test result:/ { seen = 1; for (i = 1; i < NF; i++) { if ($(i + 1) ~ /^passed/) p += $i; if ($(i + 1) ~ /^failed/) f += $i } }
                 END { if (!seen) print "- -"; else print p + 0, f + 0 }' "/tmp/tests-$backend.log")
    passed=${counts% *}
    failed=${counts#* }
    if [ "$rc" = 0 ] && [ "$passed" != - ] && [ "$passed" -gt 0 ] && [ "$failed" = 0 ]; then
        result=pass
    else
        result=fail
    fi
    if [ "$passed" = - ]; then tests=-; else tests=$((passed + failed)); fi
    time=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    echo "VM-VERDICT backend=$backend result=$result tests=$tests failed=$failed exit=$rc time=${time}s"
done

echo "VM-DOCTOR-BEGIN"
start=$(uptime_s)
/bin/port-trace doctor -v 2>&1
rc=$?
time=$(awk -v a="$start" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
echo "VM-DOCTOR-END exit=$rc time=${time}s"
echo "VM-DONE uptime=$(uptime_s)s"
power_off
