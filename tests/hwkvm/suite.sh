# The smoke suite, sourced by /init once /dev/kvm is up (see init.sh for pass, fail and
# app). Each check runs real programs in picoprocesses on hardware-style KVM.
#
# $paging is "npt" (kvm_amd with nested paging: the whole suite) or "shadow" (npt=0: KVM
# shadows the guest page tables; the checks that depend on the paging mode run again, with
# "-shadow" appended to their names). Under TCG, QEMU flushes its TLB at every VMRUN, so
# only the shadow pass can catch a missing invalidation.

if [ "$paging" = shadow ]; then
    sfx=-shadow
    expect="hardware KVM with shadow paging (syscall enters CPL 0"
else
    sfx=
    expect="hardware KVM (syscall enters CPL 0; invalidate by guest TLB flush)"
fi

# The VMM must detect hardware KVM (not kvm_pvm) and say so.
app -v run /guests/hello-static 7
if ! grep -qF "$expect" /tmp/err; then
    fail platform-is-hardware-kvm$sfx "the VMM did not report: $expect"
elif [ $status -ne 7 ] || ! grep -q "^hello from a picoprocess: argc=2" /tmp/out; then
    fail static-hello$sfx "status $status"
else
    pass platform-is-hardware-kvm$sfx
    pass static-hello$sfx
fi

# Forwarded syscalls with checked results: every one an exit (each return is the VMM's
# CPL 0 -> 3 fix-up), then through the mailbox.
app run --no-mailbox /guests/syscall_loop-static 2000
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass syscall-loop-exits$sfx
else
    fail syscall-loop-exits$sfx "status $status"
fi

# A page used, then unmapped or made read-only, must fault when touched again: the
# invalidation branch of the platform.
app run /guests/memory-static munmap-touch
if [ $status -eq 139 ] && grep -q "segmentation fault: read at 0x" /tmp/err; then
    pass munmap-touch-faults$sfx
else
    fail munmap-touch-faults$sfx "status $status, expected 139 and a read fault"
fi
app -v run /guests/memory-static mprotect-write
if [ $status -eq 139 ] && grep -q "segmentation fault: write at 0x" /tmp/err; then
    pass mprotect-write-faults$sfx
else
    fail mprotect-write-faults$sfx "status $status, expected 139 and a write fault"
fi
app run /guests/memory-static ok
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass memory-checks$sfx
else
    fail memory-checks$sfx "status $status"
fi

# Threads: the pthread program (switches between threads at CPL 0 returns), and a page one
# thread unmaps must fault in another that used it.
app run /guests/threads-static
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass threads$sfx
else
    fail threads$sfx "status $status"
fi
app run /guests/threads-static unmap-across
if [ $status -eq 139 ] && grep -q "segmentation fault: read at 0x" /tmp/err; then
    pass threads-unmap-across$sfx
else
    fail threads-unmap-across$sfx "status $status, expected 139 and a read fault"
fi
# The same with a vCPU per thread: each vCPU flushes its own TLB after another's unmap.
app run --vcpus 4 /guests/threads-static
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass threads-vcpus$sfx
else
    fail threads-vcpus$sfx "status $status"
fi
app run --vcpus 2 /guests/threads-static unmap-across
if [ $status -eq 139 ] && grep -q "segmentation fault: read at 0x" /tmp/err; then
    pass threads-unmap-across-vcpus$sfx
else
    fail threads-unmap-across-vcpus$sfx "status $status, expected 139 and a read fault"
fi

# Bad pointers give EFAULT (clock_gettime's is answered in the doorbell, at CPL 0 here:
# its fault is an exception taken in ring 0).
app run /guests/hostile-static bad-pointers
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass hostile-bad-pointers$sfx
else
    fail hostile-bad-pointers$sfx "status $status"
fi

# pread64 and fstat answered by the doorbell from a file window (copies at CPL 0 from a
# user page above the user range, faults on the app's buffer taken in ring 0, windows
# taken down as fds close), against the program's native output.
app run /guests/guest_reads-static /guests/guest_reads-static
if [ $status -eq 0 ] && cmp -s /tmp/out /expected/guest_reads.txt; then
    pass guest-reads$sfx
else
    fail guest-reads$sfx "status $status: $(tail -3 /tmp/out /tmp/err)"
fi

[ "$paging" = shadow ] && return 0

app run /guests/hostile-static ud2
if [ $status -eq 132 ] && grep -q "invalid opcode (#UD)" /tmp/err; then
    pass hostile-ud2
else
    fail hostile-ud2 "status $status, expected 132 and #UD"
fi

# Handlers, masks, timers and fault handlers: signal frames built while the app was in the
# doorbell at CPL 0, and rt_sigreturn through it.
app run --timeout 30 /guests/signals-static ok
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass signals
else
    fail signals "status $status"
fi

# A signal storm while the app makes calls of every kind: wherever a kick stops it in the
# doorbell (at CPL 0 here), the VMM completes or rewinds the call and gives the handler
# the app's own context, with the user segments back. Every exit costs ~0.1 ms under TCG
# and a handler run several, so the timer's period is 20 ms here (a faster one only
# starves the app, as a slow handler does on Linux); it also caught the doorbell's clock
# wrapping when the guest TSC read a few ticks behind the time page's base.
app -v run --timeout 60 /guests/storm-static 3 20000
echo "HWKVM INFO storm: $(grep iterations= /tmp/out) $(grep -o 'rewound_in_doorbell: [0-9]*, completed_in_doorbell: [0-9]*' /tmp/err)"
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass signal-storm
else
    fail signal-storm "status $status: $(tail -3 /tmp/out /tmp/err)"
fi

app run /bin/busybox echo hello world
if [ $status -eq 0 ] && [ "$(cat /tmp/out)" = "hello world" ]; then
    pass busybox-echo
else
    fail busybox-echo "status $status"
fi

app run /bin/busybox sh -c 'exit 3'
if [ $status -eq 3 ]; then pass busybox-sh-exit-3; else fail busybox-sh-exit-3 "status $status"; fi

# Processes: fork, execve and wait (each child a new VM whose syscalls enter CPL 0), and
# a shell pipeline over the initramfs's busybox applets.
app run /guests/fork-static
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass fork-exec-wait
else
    fail fork-exec-wait "status $status: $(tail -3 /tmp/out /tmp/err)"
fi
app run --root / /bin/sh -c 'echo one two three | wc -w; echo $(echo a b | wc -c)'
if [ $status -eq 0 ] && [ "$(cat /tmp/out)" = "$(printf '3\n4')" ]; then
    pass shell-pipeline
else
    fail shell-pipeline "status $status: $(tail -3 /tmp/out /tmp/err)"
fi

# The dynamically linked malloc/stdio/files/qsort workload, against its native output.
app run /guests/workload-dynamic /tmp/workload.txt
if [ $status -eq 0 ] && cmp -s /tmp/out /expected/workload.txt; then
    pass dynamic-workload
else
    fail dynamic-workload "status $status; expected $(cat /expected/workload.txt)"
fi

app run /guests/syscall_loop-static 2000
if [ $status -eq 0 ] && grep -q "^PASSED" /tmp/out; then
    pass syscall-loop-mailbox
else
    fail syscall-loop-mailbox "status $status"
fi
# Threads on vCPUs of their own make mailbox calls while signalled: each is answered as
# its own thread.
app run --vcpus 4 /guests/threads-static own-calls 200
if [ $status -eq 0 ] && grep -q "^own-calls: PASSED" /tmp/out; then
    pass threads-own-calls-vcpus
else
    fail threads-own-calls-vcpus "status $status"
fi

# Exit costs, for BENCHMARKS.md (ns per iteration).
app run --no-mailbox /guests/syscall_bench-static mmio-exit 2000
echo "HWKVM INFO bare_exit_ns=$(cat /tmp/out)"
app run --no-mailbox /guests/syscall_bench-static getppid 2000
echo "HWKVM INFO forwarded_syscall_ns=$(cat /tmp/out)"
app run /guests/syscall_bench-static getppid 2000
echo "HWKVM INFO mailbox_syscall_ns=$(cat /tmp/out)"
app run /guests/syscall_bench-static getpid 20000
echo "HWKVM INFO doorbell_getpid_ns=$(cat /tmp/out)"

# A counter-http snapshot taken on the host (kvm_pvm, count=1) restores here and counts on.
. /snapshot.sh
