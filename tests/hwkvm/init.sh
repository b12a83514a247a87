#!/bin/busybox sh
# /init of the hardware-KVM smoke suite (see tests/hwkvm.rs, which packs this initramfs and
# boots it under QEMU TCG with an emulated AMD SVM CPU).
#
# It loads kvm_amd, then runs picoprocesses on the hardware-style /dev/kvm and prints one
# line per check on the serial console:
#   HWKVM PASS <name>
#   HWKVM FAIL <name>: <why>       (followed by the app's output, indented)
#   HWKVM INFO <key>=<value>       (measurements)
# and finally "HWKVM DONE passed=<n> failed=<m>" before powering off. QEMU's exit status
# says nothing about the tests; the host reads these lines.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "HWKVM PASS $1"; }
# fail NAME WHY: reports the last app's output too.
fail() {
    failed=$((failed + 1))
    echo "HWKVM FAIL $1: $2"
    for f in /tmp/out /tmp/err; do
        [ -s $f ] && sed 's/^/    /' $f | tail -n 25
    done
}
finish() {
    echo "HWKVM DONE passed=$passed failed=$failed"
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 5
}

# Every picoprocess runs with a time limit of its own; the host kills QEMU on top of that.
export PICOCENTER_STATE_DIR=/tmp/state NO_COLOR=1
app() {
    timeout -s KILL 60 /bin/picocenter "$@" > /tmp/out 2> /tmp/err < /dev/null
    status=$?
}

# load_kvm NAME [kvm-amd parameters...]: (re)loads kvm_amd and waits for /dev/kvm.
load_kvm() {
    name=$1
    shift
    rmmod kvm_amd 2>/dev/null
    insmod /modules/kvm-amd.ko "$@"
    i=0
    while [ ! -c /dev/kvm ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -c /dev/kvm ] && [ -d /sys/module/kvm_amd ] && [ ! -d /sys/module/kvm_pvm ]; then
        pass $name
        echo "HWKVM INFO npt=$(cat /sys/module/kvm_amd/parameters/npt) nrips=$(cat /sys/module/kvm_amd/parameters/nrips)"
    else
        fail $name "no /dev/kvm from kvm_amd (does the CPU model have svm?)"
        dmesg | tail -n 20
        finish
    fi
}

echo "HWKVM INFO kernel=$(uname -r)"
insmod /modules/irqbypass.ko
insmod /modules/kvm.ko
ip link set lo up

# Nested paging (the default), then shadow paging.
load_kvm kvm-amd-loaded
paging=npt
. /suite.sh
load_kvm kvm-amd-loaded-shadow npt=0
paging=shadow
. /suite.sh

finish
