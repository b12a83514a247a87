# Snapshots on hardware KVM, sourced by suite.sh. tests/hwkvm.rs packs the image root of
# counter-http at /srv/counter-http, and at /snap a snapshot of it taken on the kvm_pvm
# host after it answered one request, with the host's snapshot key at /snap.key.

# serve_and_get ARGS...: starts `picocenter ARGS` (an app serving HTTP) in the
# background and sets $answer to the body of GET http://$ip/ (empty if it never answered).
serve_and_get() {
    rm -f /tmp/out /tmp/err
    timeout -s KILL 60 /bin/picocenter "$@" > /tmp/out 2> /tmp/err < /dev/null &
    server=$!
    answer=
    i=0
    while [ -z "$answer" ] && [ $i -lt 300 ] && kill -0 $server 2>/dev/null; do
        # (busybox nc: Debian's static busybox wget crashes on a successful fetch)
        answer=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 $ip 80 2>/dev/null | tail -n 1)
        [ -z "$answer" ] && sleep 0.1
        i=$((i + 1))
    done
}
stop_server() {
    kill $server 2>/dev/null
    wait $server 2>/dev/null
}

# 1. The kvm_pvm snapshot. It restores only where this CPU offers every CPU feature the app
# could rely on there, and the host's (AVX-512, SHA, GFNI...) are more than QEMU's TCG
# emulates: then the VMM must refuse it cleanly, naming what is missing.
ip=127.0.9.1
serve_and_get snapshot restore /snap --root /srv/counter-http --address $ip --key-file /snap.key
stop_server
if [ "$answer" = "count=2" ]; then
    pass snapshot-from-kvm-pvm
    echo "HWKVM INFO snapshot_from_kvm_pvm=restored"
elif grep -q "the snapshot needs CPU features this host lacks" /tmp/err \
    && ! grep -q panicked /tmp/err; then
    pass snapshot-from-kvm-pvm
    echo "HWKVM INFO snapshot_from_kvm_pvm=refused: $(sed -n 's/.*needs CPU features this host lacks: //p' /tmp/err)"
else
    fail snapshot-from-kvm-pvm "answered '$answer': neither count=2 nor a clean refusal"
fi

# 2. Snapshot and restore on hardware KVM: the count goes on.
ip=127.0.9.2
serve_and_get run --root /srv/counter-http --name hw-counter --address $ip /bin/counter-http
first=$answer
timeout -s KILL 60 /bin/picocenter snapshot create hw-counter -o /tmp/hwsnap --stop \
    > /tmp/create.out 2>&1
created=$?
wait $server
ran=$?
serve_and_get snapshot restore /tmp/hwsnap --root /srv/counter-http
stop_server
if [ "$first" = "count=1" ] && [ $created -eq 0 ] && [ $ran -eq 0 ] \
    && [ "$answer" = "count=2" ]; then
    pass snapshot-restore-on-hardware-kvm
else
    cat /tmp/create.out >> /tmp/err
    fail snapshot-restore-on-hardware-kvm \
        "first '$first', snapshot create status $created, app status $ran, after restore '$answer'"
fi
